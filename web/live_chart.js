// DreamBooth Studio: a live chart inside the LoRA Train and DreamBooth Train nodes.
//
// While a node trains, the pack's websocket events (dreambooth_studio.step / .samples / .status,
// each naming the node's unique id) feed a chart drawn here on a 2D canvas: the training loss
// (faint), its moving average (bold), the validation loss (points and line), the learning rate
// (a strip below) and, when the node scores its samples, DINO / CLIP-I / CLIP-T per sample round
// with the best step marked (a second strip), with step, seconds per step, ETA and status above
// it and the newest sample images below it. After a page reload (or a websocket reconnect during a run) the chart catches
// up from GET /dreambooth_studio/runs/<node id>; the node's UI output after a run fills it too.

const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const PACK = "dreambooth_studio";
const TRAINING_NODES = new Set(["LoRATrain", "DreamBoothTrain"]);
const TERMINAL = new Set(["finished", "failed", "cancelled", "reused"]);
const WIDGET_NAME = "live_chart";
// CSS pixels of the widget: status line, chart (plot and learning-rate strip), sample strip, and
// the margin the frontend keeps around a DOM widget (10 px each side).
const HEADER_HEIGHT = 18;
const CHART_HEIGHT = 220;
const STRIP_HEIGHT = 122;
const WIDGET_HEIGHT = HEADER_HEIGHT + CHART_HEIGHT + STRIP_HEIGHT + 4 + 20;
const NODE_MIN_WIDTH = 440;

// Every chart on the page, so the module's api listeners can hand each event to its node.
const charts = new Set();

const finite = (value) => (typeof value === "number" && Number.isFinite(value) ? value : null);
const wholeStep = (value) => (Number.isInteger(value) && value >= 0 ? value : null);

// The id the server knows a node by: its own id at the top level, "<subgraph node>:<id>" (and so
// on) inside subgraphs.
function executionId(node) {
    const graph = node.graph;
    const root = app.graph;
    if (!graph || !root || graph === root) return String(node.id);
    const path = pathToGraph(root, graph, []);
    return path ? [...path, node.id].join(":") : String(node.id);
}

function pathToGraph(graph, target, prefix) {
    for (const candidate of graph.nodes ?? graph._nodes ?? []) {
        const inner = candidate.subgraph;
        if (!inner) continue;
        const here = [...prefix, candidate.id];
        if (inner === target) return here;
        const deeper = pathToGraph(inner, target, here);
        if (deeper) return deeper;
    }
    return null;
}

// A round's scores when all three are finite numbers, else null.
function readScores(scores) {
    if (!scores || typeof scores !== "object") return null;
    const read = { dino: finite(scores.dino), clip_i: finite(scores.clip_i), clip_t: finite(scores.clip_t) };
    return Object.values(read).every((v) => v !== null) ? read : null;
}

function formatNumber(value) {
    if (value === null) return "-";
    const size = Math.abs(value);
    if (size !== 0 && (size < 1e-3 || size >= 1e4)) return value.toExponential(1).replace("e+", "e");
    return value.toPrecision(3).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
}

function formatSeconds(seconds) {
    if (seconds === null) return "-";
    if (seconds < 60) return `${Math.round(seconds)} s`;
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return `${minutes}:${String(Math.round(seconds % 60)).padStart(2, "0")}`;
    return `${Math.floor(minutes / 60)} h ${String(minutes % 60).padStart(2, "0")} min`;
}

function movingAverage(points, window) {
    const out = [];
    let sum = 0;
    const inWindow = [];
    for (const [step, value] of points) {
        inWindow.push(value);
        sum += value;
        if (inWindow.length > window) sum -= inWindow.shift();
        out.push([step, sum / inWindow.length]);
    }
    return out;
}

function parseColor(text) {
    const probe = document.createElement("canvas").getContext("2d");
    probe.fillStyle = "#000";
    probe.fillStyle = text || "#000";
    const value = probe.fillStyle;  // "#rrggbb" or "rgba(r, g, b, a)"
    if (value.startsWith("#")) return [1, 3, 5].map((i) => parseInt(value.slice(i, i + 2), 16));
    return value.replace(/[^\d.,]/g, "").split(",").slice(0, 3).map(Number);
}

// Colours from the CSS variables the frontend sets for its palette (light or dark).
function readTheme() {
    const style = getComputedStyle(document.documentElement);
    const variable = (name, fallback) => style.getPropertyValue(name).trim() || fallback;
    const background = variable("--comfy-menu-bg", "#202020");
    const [r, g, b] = parseColor(background);
    const light = (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255 > 0.5;
    const foreground = variable("--fg-color", light ? "#222" : "#ddd");
    return {
        key: `${background}|${foreground}`,
        light,
        text: foreground,
        muted: variable("--descrip-text", light ? "#666" : "#999"),
        grid: light ? "rgba(0, 0, 0, 0.12)" : "rgba(255, 255, 255, 0.12)",
        loss: light ? "rgba(21, 101, 192, 0.4)" : "rgba(110, 180, 255, 0.45)",
        average: light ? "#1565c0" : "#6eb4ff",
        validation: light ? "#d35400" : "#ffab40",
        lr: light ? "#2e7d32" : "#7bd88f",
        // subject-fidelity scores of the sample rounds (DINO, CLIP-I, CLIP-T) and the best step
        dino: light ? "#6a1b9a" : "#d59cff",
        clipI: light ? "#00838f" : "#4dd0e1",
        clipT: light ? "#ad1457" : "#ff80ab",
        status: {
            running: light ? "#1565c0" : "#6eb4ff",
            finished: light ? "#2e7d32" : "#7bd88f",
            reused: light ? "#2e7d32" : "#7bd88f",
            failed: light ? "#c62828" : "#ff6b6b",
            cancelled: light ? "#8d6e00" : "#ffd54f",
        },
    };
}

// One run of one node as the chart knows it; events and catch-up documents merge into it by step,
// so a point that arrives twice (an event and a catch-up) is drawn once.
class RunData {
    constructor(promptId = null) {
        this.promptId = promptId;
        this.status = null;
        this.total = null;
        this.method = null;
        this.output = null;
        this.steps = new Map();  // step -> {loss, lr, elapsed, instance_loss, prior_loss}
        this.validation = new Map();  // step -> loss
        this.samples = new Map();  // step -> {seconds, images: [{filename, subfolder, type, prompt}], scores}
        this.best = null;  // {step, file}: the best scored step, named when the run ends
    }

    get lastStep() {
        let last = 0;
        for (const step of this.steps.keys()) last = Math.max(last, step);
        return last;
    }

    addStep(entry) {
        const step = wholeStep(entry?.step);
        if (step === null || step === 0) return false;
        this.steps.set(step, {
            loss: finite(entry.loss), lr: finite(entry.lr), elapsed: finite(entry.elapsed),
            instance_loss: finite(entry.instance_loss), prior_loss: finite(entry.prior_loss),
        });
        return true;
    }

    addValidation(points) {
        for (const point of Array.isArray(points) ? points : []) {
            const step = Array.isArray(point) ? wholeStep(point[0]) : null;
            const loss = Array.isArray(point) ? finite(point[1]) : null;
            if (step !== null && loss !== null) this.validation.set(step, loss);
        }
    }

    addSamples(round) {
        const step = wholeStep(round?.step);
        if (step === null || !Array.isArray(round.images)) return false;
        const images = round.images
            .filter((image) => image && typeof image.filename === "string" && image.filename)
            .map((image) => ({
                filename: image.filename,
                subfolder: typeof image.subfolder === "string" ? image.subfolder : "",
                type: typeof image.type === "string" ? image.type : "output",
                prompt: typeof image.prompt === "string" ? image.prompt : "",
            }));
        this.samples.set(step, { seconds: finite(round.seconds), images, scores: readScores(round.scores) });
        return true;
    }

    // [step, {dino, clip_i, clip_t}] of the rounds that were scored, oldest first
    scoredRounds() {
        return [...this.samples.entries()].filter(([, r]) => r.scores).sort((a, b) => a[0] - b[0])
            .map(([step, r]) => [step, r.scores]);
    }

    setHeader(data) {
        if (typeof data.status === "string") {
            // a late "running" (a catch-up sent before the end) never hides how the run ended
            if (!(data.status === "running" && TERMINAL.has(this.status))) this.status = data.status;
        }
        const total = wholeStep(data.total);
        if (total) this.total = total;
        if (typeof data.method === "string") this.method = data.method;
        if (typeof data.output === "string") this.output = data.output;
        const best = data.best && typeof data.best === "object" ? wholeStep(data.best.step) : null;
        if (best !== null && typeof data.best.file === "string") this.best = { step: best, file: data.best.file };
    }

    sortedSteps() {
        return [...this.steps.entries()].sort((a, b) => a[0] - b[0]);
    }

    newestSamples() {
        let newest = null;
        for (const step of this.samples.keys()) if (newest === null || step > newest) newest = step;
        return newest === null ? null : { step: newest, ...this.samples.get(newest) };
    }

    // Seconds per step over the newest steps (sampling rounds included: they are part of the run).
    secondsPerStep() {
        const timed = this.sortedSteps().filter(([, e]) => e.elapsed !== null);
        if (timed.length < 2) return timed.length === 1 && timed[0][0] > 0 ? timed[0][1].elapsed / timed[0][0] : null;
        const last = timed[timed.length - 1];
        const first = timed[Math.max(0, timed.length - 11)];
        if (last[0] === first[0]) return null;
        return (last[1].elapsed - first[1].elapsed) / (last[0] - first[0]);
    }
}

class LiveChart {
    constructor(node) {
        this.node = node;
        this.run = new RunData();
        this.resets = 0;  // how many times a newer run replaced the data (guards late catch-ups)
        this.removed = false;
        this.frame = null;
        this.catchUpTimer = null;
        this.fetching = null;
        this.fetchAgain = false;
        this.theme = readTheme();
        this.shownSamples = undefined;  // key of the sample round on screen (null: none)
        this.buildElement();
        this.resizeObserver = new ResizeObserver(() => this.requestDraw());
        this.resizeObserver.observe(this.canvas);
        // The frontend switches palettes by rewriting CSS variables on <html> (and classes on <body>).
        this.themeObserver = new MutationObserver(() => {
            const theme = readTheme();
            if (theme.key !== this.theme.key) {
                this.theme = theme;
                this.requestDraw();
            }
        });
        this.themeObserver.observe(document.documentElement, { attributes: true, attributeFilter: ["style", "class"] });
        this.themeObserver.observe(document.body, { attributes: true, attributeFilter: ["style", "class"] });
        charts.add(this);
    }

    get id() {
        return executionId(this.node);
    }

    // In a graph right now (a node is created before it is added, and some edits, such as turning
    // nodes into a subgraph, drop a node without telling it).
    get attached() {
        const graph = this.node.graph;
        return !!graph && (graph.getNodeById?.(this.node.id) ?? null) === this.node;
    }

    buildElement() {
        const root = document.createElement("div");
        root.className = "dbs-live";
        // The chart takes no pointer events: wheel and drag over it reach the canvas (or the Vue
        // node) underneath, as over any other part of the node. Sample images take them (tooltips).
        root.style.cssText = `display:flex;flex-direction:column;gap:2px;width:100%;height:100%;box-sizing:border-box;
            padding:0 2px;pointer-events:none;font:11px sans-serif;overflow:hidden`;
        const header = document.createElement("div");
        header.className = "dbs-live-header";
        header.style.cssText = `display:flex;justify-content:space-between;gap:8px;height:${HEADER_HEIGHT}px;
            line-height:${HEADER_HEIGHT}px;flex:0 0 ${HEADER_HEIGHT}px;white-space:nowrap;overflow:hidden`;
        this.progressText = document.createElement("span");
        this.progressText.className = "dbs-live-progress";
        this.progressText.style.cssText = "overflow:hidden;text-overflow:ellipsis";
        this.statusText = document.createElement("span");
        this.statusText.className = "dbs-live-status";
        this.statusText.style.cssText = "font-weight:bold";
        header.append(this.progressText, this.statusText);
        this.canvas = document.createElement("canvas");
        this.canvas.className = "dbs-live-chart";
        // the chart takes what the node gives beyond the status line and the sample strip
        this.canvas.style.cssText = `display:block;width:100%;min-height:120px;flex:1 1 ${CHART_HEIGHT}px`;
        const strip = document.createElement("div");
        strip.className = "dbs-live-samples";
        strip.style.cssText = `display:flex;flex-direction:column;gap:2px;height:${STRIP_HEIGHT}px;flex:0 0 ${STRIP_HEIGHT}px;overflow:hidden`;
        this.stripCaption = document.createElement("div");
        this.stripCaption.className = "dbs-live-samples-caption";
        this.stripCaption.style.cssText = "white-space:nowrap;overflow:hidden;text-overflow:ellipsis;height:14px;line-height:14px";
        this.stripImages = document.createElement("div");
        this.stripImages.className = "dbs-live-samples-images";
        this.stripImages.style.cssText = "display:flex;gap:4px;flex:1 1 auto;min-height:0;overflow:hidden";
        strip.append(this.stripCaption, this.stripImages);
        root.append(header, this.canvas, strip);
        this.element = root;
    }

    // -- data in -------------------------------------------------------------------------------
    startRun(promptId) {
        this.run = new RunData(promptId);
        this.resets += 1;
    }

    onStep(detail) {
        if (detail.prompt_id !== this.run.promptId) this.startRun(detail.prompt_id ?? null);
        const before = this.run.lastStep;
        this.run.setHeader({ total: detail.total, status: this.run.status ?? "running" });
        this.run.addValidation(detail.validation);
        if (!this.run.addStep(detail)) return;
        // A step we had no event for (the page loaded mid-run, or the socket dropped): catch up.
        if (detail.step > before + 1) this.scheduleCatchUp();
        this.requestDraw();
    }

    onSamples(detail) {
        if (detail.prompt_id !== this.run.promptId) this.startRun(detail.prompt_id ?? null);
        if (this.run.addSamples(detail)) this.requestDraw();
    }

    onStatus(detail) {
        if (detail.prompt_id !== this.run.promptId) {
            if (detail.status !== "running" && this.run.promptId !== null) this.scheduleCatchUp();
            this.startRun(detail.prompt_id ?? null);
        }
        this.run.setHeader(detail);
        // The end of a run: one catch-up fills whatever events this page missed (a reused file's
        // history arrives this way too).
        if (TERMINAL.has(detail.status)) this.scheduleCatchUp();
        this.requestDraw();
    }

    // A whole run: the catch-up route's answer or the node's UI output after the run.
    applyRun(data, resetsWhenAsked = this.resets) {
        if (!data || typeof data !== "object" || !Array.isArray(data.steps)) return;
        const promptId = data.prompt_id ?? null;
        if (promptId !== this.run.promptId) {
            // a newer run began while this answer was on its way: it is stale
            if (this.resets !== resetsWhenAsked) return;
            this.startRun(promptId);
        }
        this.run.setHeader(data);
        for (const entry of data.steps) this.run.addStep(entry);
        this.run.addValidation(data.validation);
        for (const round of Array.isArray(data.samples) ? data.samples : []) this.run.addSamples(round);
        this.requestDraw();
    }

    scheduleCatchUp() {
        if (this.removed || this.catchUpTimer !== null) return;
        this.catchUpTimer = setTimeout(() => {
            this.catchUpTimer = null;
            this.catchUp();
        }, 50);
    }

    async catchUp() {
        if (this.removed) return;
        if (this.fetching) {
            this.fetchAgain = true;
            return;
        }
        const id = this.id;
        if (!id || id === "-1") return;
        const asked = this.resets;
        const controller = new AbortController();
        this.fetching = controller;
        try {
            const response = await api.fetchApi(`/${PACK}/runs/${encodeURIComponent(id)}`, { signal: controller.signal, cache: "no-store" });
            // 404: this node has not trained in this server session; nothing to show, nothing to say
            if (response.ok && !this.removed && id === this.id) this.applyRun(await response.json(), asked);
        } catch (error) {
            if (error?.name !== "AbortError") console.warn(`[${PACK}] could not catch up node ${id}:`, error);
        } finally {
            this.fetching = null;
            if (this.fetchAgain && !this.removed) {
                this.fetchAgain = false;
                this.scheduleCatchUp();
            }
        }
    }

    // -- drawing -------------------------------------------------------------------------------
    requestDraw() {
        if (this.removed || this.frame !== null) return;
        this.frame = requestAnimationFrame(() => {
            this.frame = null;
            this.draw();
        });
    }

    draw() {
        if (this.removed) return;
        this.drawHeader();
        this.drawChart();
        this.drawStrip();
    }

    drawHeader() {
        const run = this.run;
        const theme = this.theme;
        const last = run.lastStep;
        const parts = [];
        if (run.method) parts.push(run.method === "dreambooth" ? "DreamBooth" : run.method === "lora" ? "LoRA" : run.method);
        parts.push(run.total ? `step ${last}/${run.total}` : `step ${last}`);
        const perStep = run.secondsPerStep();
        if (perStep !== null) parts.push(`${formatNumber(perStep)} s/step`);
        if (run.status === "running" && perStep !== null && run.total) parts.push(`ETA ${formatSeconds(Math.max(0, run.total - last) * perStep)}`);
        this.progressText.textContent = run.status === null && last === 0 ? "no run yet: queue the prompt to train" : parts.join(" · ");
        this.progressText.style.color = theme.text;
        this.statusText.textContent = run.status ?? "";
        this.statusText.style.color = theme.status[run.status] ?? theme.muted;
    }

    drawChart() {
        const canvas = this.canvas;
        const width = canvas.clientWidth;
        const height = canvas.clientHeight;
        if (width < 20 || height < 20) return;
        // backing pixels for the size on screen (the classic canvas scales DOM widgets when zoomed)
        const shown = canvas.getBoundingClientRect().width / width;
        const ratio = (window.devicePixelRatio || 1) * Math.min(4, Math.max(1, Number.isFinite(shown) ? shown : 1));
        if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
            canvas.width = Math.round(width * ratio);
            canvas.height = Math.round(height * ratio);
        }
        const ctx = canvas.getContext("2d");
        ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
        ctx.clearRect(0, 0, width, height);
        const theme = this.theme;
        ctx.font = "10px sans-serif";
        ctx.textBaseline = "middle";

        const run = this.run;
        const steps = run.sortedSteps();
        const losses = steps.filter(([, e]) => e.loss !== null).map(([step, e]) => [step, e.loss]);
        const validation = [...run.validation.entries()].sort((a, b) => a[0] - b[0]);
        const rates = steps.filter(([, e]) => e.lr !== null).map(([step, e]) => [step, e.lr]);
        const span = Math.max(3, Math.min(50, Math.round((run.total || losses.length) / 10)));
        const average = movingAverage(losses, span);

        const scored = run.scoredRounds();
        const lrHeight = rates.length ? 26 : 0;
        const fidelityHeight = scored.length ? 46 : 0;
        // The validation loss has its own scale on the right: computed at fixed timesteps and noise,
        // its level is not comparable with the training loss, and its slow fall is what to watch.
        const box = { left: 46, right: width - (validation.length ? 46 : 8), top: 22,
            bottom: height - 18 - lrHeight - fidelityHeight };
        const xMax = Math.max(run.total || 0, run.lastStep, ...validation.map(([s]) => s), 1);
        if (!losses.length && !validation.length) {
            ctx.fillStyle = theme.muted;
            ctx.textAlign = "center";
            ctx.fillText(run.status ? "waiting for the first step" : "the loss appears here while the node trains",
                (box.left + box.right) / 2, (box.top + box.bottom) / 2);
            this.drawFrame(ctx, box, theme);
            return;
        }
        const x = (step) => box.left + (step / xMax) * (box.right - box.left);
        const axis = (values) => {
            let low = Math.min(...values);
            let high = Math.max(...values);
            if (high - low < 1e-9) {
                const pad = Math.max(Math.abs(high) * 0.05, 1e-4);
                low -= pad;
                high += pad;
            }
            const margin = (high - low) * 0.08;
            low -= margin;
            high += margin;
            const scale = (value) => box.bottom - ((value - low) / (high - low)) * (box.bottom - box.top);
            // as many decimals as tell the ticks (a third of the range apart) from each other
            const decimals = Math.min(6, Math.max(0, Math.ceil(-Math.log10((high - low) / 3)) + 1));
            scale.format = (value) => (Math.abs(value) >= 1e-3 || value === 0 ? value.toFixed(decimals) : formatNumber(value));
            return scale;
        };
        const trainValues = losses.map(([, v]) => v);
        const y = axis(trainValues.length ? trainValues : validation.map(([, v]) => v));
        const yVal = validation.length ? axis(validation.map(([, v]) => v)) : y;
        const valueAt = (scale, screenY) => {  // the inverse of a scale, for tick labels
            const a = scale(0);
            const b = scale(1);
            return (screenY - a) / (b - a);
        };

        // grid and axes: training loss on the left, validation loss on the right
        ctx.strokeStyle = theme.grid;
        ctx.lineWidth = 1;
        for (let i = 0; i <= 3; i++) {
            const yy = Math.round(box.bottom - ((box.bottom - box.top) * i) / 3) + 0.5;
            ctx.beginPath();
            ctx.moveTo(box.left, yy);
            ctx.lineTo(box.right, yy);
            ctx.stroke();
            if (trainValues.length) {
                ctx.fillStyle = theme.muted;
                ctx.textAlign = "right";
                ctx.fillText(y.format(valueAt(y, yy)), box.left - 4, yy);
            }
            if (validation.length) {
                ctx.fillStyle = theme.validation;
                ctx.textAlign = "left";
                ctx.fillText(yVal.format(valueAt(yVal, yy)), box.right + 4, yy);
            }
        }
        ctx.fillStyle = theme.muted;
        for (const step of [...new Set([0, Math.round(xMax / 2), xMax])]) {
            ctx.textAlign = step === 0 ? "left" : step === xMax ? "right" : "center";
            ctx.fillText(String(step), x(step), box.bottom + 9);
        }
        this.drawFrame(ctx, box, theme);

        // training loss, its moving average, validation loss
        const line = (points, color, widthPx) => {
            if (!points.length) return;
            ctx.strokeStyle = color;
            ctx.lineWidth = widthPx;
            ctx.lineJoin = "round";
            ctx.beginPath();
            points.forEach(([step, value], i) => (i ? ctx.lineTo(x(step), y(value)) : ctx.moveTo(x(step), y(value))));
            if (points.length === 1) ctx.lineTo(x(points[0][0]) + 0.5, y(points[0][1]));
            ctx.stroke();
        };
        ctx.save();
        ctx.beginPath();
        ctx.rect(box.left, box.top - 2, box.right - box.left, box.bottom - box.top + 4);
        ctx.clip();
        line(losses, theme.loss, 1);
        line(average, theme.average, 2.25);
        ctx.strokeStyle = theme.validation;
        ctx.lineWidth = 1.5;
        ctx.beginPath();
        validation.forEach(([step, value], i) => (i ? ctx.lineTo(x(step), yVal(value)) : ctx.moveTo(x(step), yVal(value))));
        ctx.stroke();
        ctx.fillStyle = theme.validation;
        for (const [step, value] of validation) {
            ctx.beginPath();
            ctx.arc(x(step), yVal(value), 2.75, 0, Math.PI * 2);
            ctx.fill();
        }
        ctx.restore();

        // legend with the newest values
        const legend = [
            [theme.loss, `loss ${formatNumber(losses.at(-1)?.[1] ?? null)}`, 1],
            [theme.average, `avg(${span}) ${formatNumber(average.at(-1)?.[1] ?? null)}`, 2.25],
        ];
        if (validation.length) legend.push([theme.validation, `val ${yVal.format(validation.at(-1)[1])}`, 1.5]);
        if (rates.length) legend.push([theme.lr, `lr ${formatNumber(rates.at(-1)[1])}`, 1.5]);
        ctx.textAlign = "left";
        let lx = box.left + 2;
        for (const [color, label, lw] of legend) {
            ctx.strokeStyle = color;
            ctx.lineWidth = lw;
            ctx.beginPath();
            ctx.moveTo(lx, 10);
            ctx.lineTo(lx + 14, 10);
            ctx.stroke();
            ctx.fillStyle = theme.text;
            ctx.fillText(label, lx + 18, 10);
            lx += 18 + ctx.measureText(label).width + 12;
        }

        // learning rate strip (its own scale: 0 to the largest rate of the run)
        if (rates.length) {
            const top = box.bottom + 20;
            const bottom = top + lrHeight - 4;
            const most = Math.max(...rates.map(([, v]) => v)) || 1;
            ctx.strokeStyle = theme.grid;
            ctx.lineWidth = 1;
            ctx.strokeRect(box.left + 0.5, top + 0.5, box.right - box.left - 1, bottom - top - 1);
            ctx.fillStyle = theme.muted;
            ctx.textAlign = "right";
            ctx.fillText("lr", box.left - 4, (top + bottom) / 2);
            ctx.strokeStyle = theme.lr;
            ctx.lineWidth = 1.5;
            ctx.beginPath();
            const ly = (value) => bottom - 2 - (value / most) * (bottom - top - 4);
            rates.forEach(([step, value], i) => (i ? ctx.lineTo(x(step), ly(value)) : ctx.moveTo(x(step), ly(value))));
            ctx.stroke();
        }

        // subject-fidelity strip: DINO, CLIP-I and CLIP-T of each scored sample round (one scale
        // for the three: they are all cosine similarities), the best step marked
        if (scored.length) this.drawFidelity(ctx, box, x, scored, box.bottom + 20 + lrHeight, height - 2);
    }

    drawFidelity(ctx, box, x, scored, top, bottom) {
        const theme = this.theme;
        const series = [["dino", theme.dino, "DINO"], ["clip_i", theme.clipI, "CLIP-I"], ["clip_t", theme.clipT, "CLIP-T"]];
        const values = scored.flatMap(([, s]) => series.map(([key]) => s[key]));
        let low = Math.min(...values);
        let high = Math.max(...values);
        if (high - low < 1e-6) { low -= 0.05; high += 0.05; }
        const plotTop = top + 12;
        const fy = (value) => bottom - 2 - ((value - low) / (high - low)) * (bottom - plotTop - 4);
        ctx.strokeStyle = theme.grid;
        ctx.lineWidth = 1;
        ctx.strokeRect(box.left + 0.5, plotTop + 0.5, box.right - box.left - 1, bottom - plotTop - 1);
        ctx.fillStyle = theme.muted;
        ctx.textAlign = "right";
        ctx.fillText(high.toFixed(2), box.left - 4, plotTop + 4);
        ctx.fillText(low.toFixed(2), box.left - 4, bottom - 4);
        const best = this.run.best;
        if (best !== null) {
            ctx.save();
            ctx.setLineDash([3, 3]);
            ctx.strokeStyle = theme.text;
            ctx.beginPath();
            ctx.moveTo(Math.round(x(best.step)) + 0.5, plotTop);
            ctx.lineTo(Math.round(x(best.step)) + 0.5, bottom);
            ctx.stroke();
            ctx.restore();
        }
        for (const [key, color] of series) {
            ctx.strokeStyle = color;
            ctx.fillStyle = color;
            ctx.lineWidth = 1.5;
            ctx.beginPath();
            scored.forEach(([step, s], i) => (i ? ctx.lineTo(x(step), fy(s[key])) : ctx.moveTo(x(step), fy(s[key]))));
            ctx.stroke();
            for (const [step, s] of scored) {
                ctx.beginPath();
                ctx.arc(x(step), fy(s[key]), 2.25, 0, Math.PI * 2);
                ctx.fill();
            }
        }
        // legend: the newest round's values, and the best step once the run has named it
        const newest = scored.at(-1)[1];
        ctx.textAlign = "left";
        let lx = box.left + 2;
        for (const [key, color, label] of series) {
            const text = `${label} ${newest[key].toFixed(3)}`;
            ctx.fillStyle = color;
            ctx.fillRect(lx, top + 3, 10, 3);
            ctx.fillStyle = theme.text;
            ctx.fillText(text, lx + 14, top + 5);
            lx += 14 + ctx.measureText(text).width + 10;
        }
        if (best !== null) {
            ctx.fillStyle = theme.text;
            ctx.fillText(`best: step ${best.step}`, lx, top + 5);
        }
    }

    drawFrame(ctx, box, theme) {
        ctx.strokeStyle = theme.grid;
        ctx.lineWidth = 1;
        ctx.strokeRect(box.left + 0.5, box.top + 0.5, box.right - box.left - 1, box.bottom - box.top - 1);
    }

    drawStrip() {
        const theme = this.theme;
        const newest = this.run.newestSamples();
        this.stripCaption.style.color = theme.muted;
        const key = newest ? `${this.run.promptId}|${newest.step}|${newest.images.map((i) => i.filename).join("|")}|${newest.scores ? 1 : 0}` : null;
        if (key === this.shownSamples) return;
        this.shownSamples = key;
        this.stripImages.replaceChildren();
        if (!newest) {
            this.stripCaption.textContent = "samples appear here every sample_every steps";
            return;
        }
        const seconds = newest.seconds !== null ? ` (${formatNumber(newest.seconds)} s)` : "";
        const scores = newest.scores
            ? `: DINO ${newest.scores.dino.toFixed(3)}, CLIP-I ${newest.scores.clip_i.toFixed(3)}, CLIP-T ${newest.scores.clip_t.toFixed(3)}`
            : "";
        this.stripCaption.textContent = `samples at step ${newest.step}${seconds}${scores}`;
        for (const image of newest.images) {
            const figure = document.createElement("figure");
            figure.style.cssText = "margin:0;display:flex;flex-direction:column;align-items:center;min-width:0;flex:0 1 104px;pointer-events:auto";
            figure.title = image.prompt;
            const img = document.createElement("img");
            const query = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder, type: image.type });
            img.src = api.apiURL(`/view?${query}`);
            img.alt = image.prompt;
            img.draggable = false;
            img.style.cssText = "height:88px;max-width:100%;object-fit:contain;image-rendering:auto;border-radius:3px";
            const caption = document.createElement("figcaption");
            caption.textContent = image.prompt;
            caption.style.cssText = `color:${theme.muted};max-width:100%;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;font-size:10px`;
            figure.append(img, caption);
            this.stripImages.append(figure);
        }
    }

    // -- teardown ------------------------------------------------------------------------------
    remove() {
        this.removed = true;
        charts.delete(this);
        this.resizeObserver.disconnect();
        this.themeObserver.disconnect();
        if (this.frame !== null) cancelAnimationFrame(this.frame);
        if (this.catchUpTimer !== null) clearTimeout(this.catchUpTimer);
        this.frame = null;
        this.catchUpTimer = null;
        this.fetching?.abort();
    }

    // What the chart holds (for tests and for anyone debugging in the console).
    summary() {
        const newest = this.run.newestSamples();
        const steps = this.run.sortedSteps().map(([step]) => step);
        return {
            node: this.id, promptId: this.run.promptId, status: this.run.status, total: this.run.total,
            steps, validation: [...this.run.validation.keys()].sort((a, b) => a - b),
            sampleSteps: [...this.run.samples.keys()].sort((a, b) => a - b),
            scored: this.run.scoredRounds().map(([step, scores]) => ({ step, ...scores })),
            best: this.run.best,
            strip: newest ? { step: newest.step, prompts: newest.images.map((i) => i.prompt) } : null,
            header: `${this.progressText.textContent} | ${this.statusText.textContent}`,
            theme: this.theme.light ? "light" : "dark",
        };
    }
}

// One listener per event type for the whole page (registering the types also keeps the newest
// frontend from logging "Unknown message type" when no training node is open); each event goes
// to the charts of the node it names, events of other nodes touch nothing.
const pageListeners = [];

function listen(type, handler) {
    api.addEventListener(type, handler);
    pageListeners.push([type, handler]);
}

function forNode(detail, action) {
    if (!detail || detail.node === undefined || detail.node === null) return;
    const id = String(detail.node);
    for (const chart of charts) if (chart.attached && chart.id === id) action(chart);
}

// Registered as soon as this module loads, before the frontend opens its socket: a page loaded
// while a run goes on receives step events at once (the newest frontend logs an error for any
// message type nobody listens to yet). The nodes' charts that the events are for come later and
// catch up through the route.
listen(`${PACK}.step`, ({ detail }) => forNode(detail, (chart) => chart.onStep(detail)));
listen(`${PACK}.samples`, ({ detail }) => forNode(detail, (chart) => chart.onSamples(detail)));
listen(`${PACK}.status`, ({ detail }) => forNode(detail, (chart) => chart.onStatus(detail)));
// Events sent while the socket was down are lost: runs still going catch up.
listen("reconnected", () => {
    for (const chart of charts) if (chart.attached && chart.run.status === "running") chart.scheduleCatchUp();
});
window.__dreamboothStudioLive = {
    charts: () => [...charts].map((chart) => chart.summary()),
    chartCount: () => charts.size,
    pageListeners: () => pageListeners.map(([type]) => type),
};

app.registerExtension({
    name: `${PACK}.live_chart`,

    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!TRAINING_NODES.has(nodeData?.name)) return;
        const proto = nodeType.prototype;

        const onNodeCreated = proto.onNodeCreated;
        proto.onNodeCreated = function () {
            const result = onNodeCreated?.apply(this, arguments);
            const chart = new LiveChart(this);
            this[`${PACK}_chart`] = chart;
            const widget = this.addDOMWidget(WIDGET_NAME, "dbs-live-chart", chart.element, {
                serialize: false,
                hideOnZoom: false,
                getValue: () => "",
                setValue: () => {},
                getMinHeight: () => WIDGET_HEIGHT,
                getMaxHeight: () => WIDGET_HEIGHT,
            });
            widget.serialize = false;
            chart.widget = widget;
            if (this.size[0] < NODE_MIN_WIDTH) this.setSize([NODE_MIN_WIDTH, this.size[1]]);
            chart.requestDraw();
            return result;
        };

        // Loaded from a workflow (page reload, opened file, tab switch): this node may have trained
        // in this server session. A node dragged in fresh has not, and asks nothing.
        const onConfigure = proto.onConfigure;
        proto.onConfigure = function () {
            const result = onConfigure?.apply(this, arguments);
            this[`${PACK}_chart`]?.scheduleCatchUp();
            return result;
        };

        const onExecuted = proto.onExecuted;
        proto.onExecuted = function (output) {
            const result = onExecuted?.apply(this, arguments);
            const run = output?.[PACK];
            if (Array.isArray(run) && run.length) this[`${PACK}_chart`]?.applyRun(run[0]);
            return result;
        };

        const onRemoved = proto.onRemoved;
        proto.onRemoved = function () {
            this[`${PACK}_chart`]?.remove();
            return onRemoved?.apply(this, arguments);
        };
    },
});
