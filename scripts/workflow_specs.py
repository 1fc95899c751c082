"""The example workflows, one per experiment of the original studies (DESIGN.md 7), as API-format
graphs with node titles, plus the Note that explains each one.

``scripts/build_workflows.py`` turns these into UI-format workflows with ComfyUI's own frontend
(example_workflows/<stem>.json + <stem>.jpg) and their API twins (scripts/api_workflows/). The
defaults are real settings for a GPU (512 px, hundreds of steps); ``small_overrides`` lists the
``--set`` options that make any of them run in seconds on the random test models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
CONTROLNET = "control_v11p_sd15_canny.safetensors"
SUBJECT_FOLDER = "my_subject"
REFERENCE_IMAGE = "reference_painting.png"
INSTANCE = "a photo of sks woman face"
CLASS = "a photo of woman face"
NEGATIVE = "blurry, lowres, deformed, disfigured, extra limbs, watermark, text"
SCENES = {
    "kitchen": "a photo of sks woman face in a kitchen",
    "forest": "a photo of sks woman face in a forest",
    "street": "a photo of sks woman face on a city street",
    "beach": "a photo of sks woman face on the beach",
    "moon": "a photo of sks woman face on the moon",
}
DINO_MODEL = "dino-vits16"  # folders in models/subject_eval (README: which models to put there)
CLIP_MODEL = "clip-vit-base-patch32"
# SCENES[...] with the class noun instead of "sks": the prompts CLIP-T scores against
BEACH_CLASS = "a photo of woman face on the beach"
FOREST_CLASS = "a photo of woman face in a forest"
FROM_INPUT = "(use the lora input)"
GENERATE = "(generate from the base model)"


class Graph:
    """Builds an API-format prompt with numeric ids and titles (``_meta.title``)."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, title: str | None = None, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        node = {"class_type": class_type, "inputs": inputs}
        if title:
            node["_meta"] = {"title": title}
        self.nodes[node_id] = node
        return node_id


def out(node_id: str, slot: int = 0) -> list:
    return [node_id, slot]


@dataclass
class WorkflowSpec:
    stem: str
    title: str
    note: str
    graph: dict
    # What the tests need in input/ besides the subject folder: {file name: kind}
    needs: dict = field(default_factory=dict)


# -- building blocks ---------------------------------------------------------------------------------

def subject(g: Graph, crop_mode: str = "face", caption_mode: str = "instance prompt", title="Load Subject Images",
            resolution: int = 512, **more) -> str:
    return g.add("LoadSubjectImages", title, folder=SUBJECT_FOLDER, instance_prompt=INSTANCE, class_prompt=CLASS,
                 resolution=resolution, max_images=0, flip=False, crop_mode=crop_mode, caption_mode=caption_mode,
                 bad_files="stop", **more)


def lora_train(g: Graph, subj: str, title: str, output_name: str, rank=16, steps=800, unet_lr=1e-4,
               text_encoder_lr=0.0, lr_scheduler="constant", seed=0, batch_size=1, **more) -> str:
    return g.add("LoRATrain", title, subject=out(subj), ckpt_name=CHECKPOINT, output_name=output_name,
                 overwrite=False, rank=rank, alpha=0.0, steps=steps, unet_lr=unet_lr,
                 text_encoder_lr=text_encoder_lr, lr_scheduler=lr_scheduler, lr_warmup_steps=0, batch_size=batch_size,
                 seed=seed, precision="auto", gradient_checkpointing=False, cache_latents=True, class_images=0,
                 prior_loss_weight=1.0, class_steps=25, class_guidance=7.5, class_seed=0, class_folder=GENERATE,
                 **watch(steps), **more)


def watch(steps: int) -> dict:
    """Samples (about 8 rounds per run) and the validation loss (about 16 points) while training."""
    every = max(1, steps // 8)
    return dict(sample_every=every, sample_prompts="", sample_seed=0, sample_steps=20, sample_cfg=7.5, sample_size=0,
                validate_every=max(1, steps // 16))


def dreambooth_train(g: Graph, subj: str, title: str, output_name: str, steps=1800, unet_lr=2e-6,
                     class_images=200) -> str:
    return g.add("DreamBoothTrain", title, subject=out(subj), ckpt_name=CHECKPOINT, output_name=output_name,
                 overwrite=False, steps=steps, unet_lr=unet_lr, text_encoder_lr=0.0, lr_scheduler="constant",
                 lr_warmup_steps=0, batch_size=1, seed=0, optimizer="adamw", precision="auto",
                 gradient_checkpointing=True, cache_latents=True, class_images=class_images, prior_loss_weight=1.0,
                 class_steps=25, class_guidance=7.5, class_seed=0, save_precision="fp16", class_folder=GENERATE,
                 **watch(steps))


def sample(g: Graph, model, clip, vae, positive: str, prefix: str, label: str, seed=123, cfg=7.5, steps=30,
           width=512, height=512, negative: str = NEGATIVE, conditioning=None) -> str:
    """CLIPTextEncode x2 (unless `conditioning` = (pos, neg) is given) -> KSampler -> VAEDecode -> SaveImage."""
    if conditioning is None:
        pos = out(g.add("CLIPTextEncode", f"Prompt: {label}", text=positive, clip=clip))
        neg = out(g.add("CLIPTextEncode", f"Negative: {label}", text=negative, clip=clip))
    else:
        pos, neg = conditioning
    latent = g.add("EmptyLatentImage", f"Latent: {label}", width=width, height=height, batch_size=1)
    sampler = g.add("KSampler", f"Sampler: {label}", model=model, positive=pos, negative=neg,
                    latent_image=out(latent), seed=seed, steps=steps, cfg=cfg, sampler_name="euler_ancestral",
                    scheduler="normal", denoise=1.0)
    decoded = g.add("VAEDecode", f"Decode: {label}", samples=out(sampler), vae=vae)
    return g.add("SaveImage", f"Save: {label}", images=out(decoded), filename_prefix=prefix)


def apply_lora(g: Graph, ckpt: str, train: str, label: str, unet_scale=1.0, te_scale=1.0) -> str:
    return g.add("ApplyLoRAScaled", f"Apply LoRA: {label}", model=out(ckpt, 0), clip=out(ckpt, 1),
                 lora_name=FROM_INPUT, unet_scale=unet_scale, text_encoder_scale=te_scale, lora=out(train, 0))


def save_loss(g: Graph, train: str, prefix: str, label: str, slot: int) -> str:
    return g.add("SaveImage", f"Loss curve: {label}", images=out(train, slot), filename_prefix=prefix)


# -- the experiments -------------------------------------------------------------------------------------

def dreambooth_lr_sweep() -> WorkflowSpec:
    g = Graph()
    subj = subject(g)
    train = dreambooth_train(g, subj, "DreamBooth Train", "sks_woman_db_lr2e-6", unet_lr=2e-6)
    save_loss(g, train, "dreambooth_lr_sweep/loss", "DreamBooth", 4)
    for scene, prompt in SCENES.items():
        sample(g, out(train, 0), out(train, 1), out(train, 2), prompt, f"dreambooth_lr_sweep/{scene}", scene)
    return WorkflowSpec("dreambooth_lr_sweep", "DreamBooth UNet learning-rate sweep", """\
# DreamBooth: UNet learning-rate sweep

Fine-tunes the whole SD1.5 UNet on ~18 photos of one face (input/my_subject/) with prior
preservation, then draws the subject in five places (kitchen, forest, street, beach, moon) with one
negative prompt and a fixed seed.

**Sweep:** run it three times with DreamBooth Train's unet_lr = 2e-6, 4e-6 and 2e-5 (and an
output_name per run, e.g. sks_woman_db_lr4e-6). The 200 class images are generated by the first
run and reused by the others. Headless:
`scripts/run_workflow.py example_workflows/dreambooth_lr_sweep.json --set "DreamBooth Train.unet_lr=4e-6" --set "DreamBooth Train.output_name=sks_woman_db_lr4e-6"`

**What to look for:** 2e-6 keeps the scenes but may not look like the subject yet; 2e-5
overfits: artefacts, the training photos' backgrounds, and several copies of the face per image.
~100 steps per photo (1800 for 18). Needs a GPU with 16 GB+ with adamw; on a smaller card use
optimizer adafactor (or adamw8bit), fused_backward on and weight_precision bf16.
""", g.nodes)


def lora_rank_sweep() -> WorkflowSpec:
    g = Graph()
    subj = subject(g)
    ckpt = g.add("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=CHECKPOINT)
    for rank in (4, 8, 16, 32, 64):
        train = lora_train(g, subj, f"LoRA Train rank {rank}", f"sks_woman_rank{rank}", rank=rank)
        applied = apply_lora(g, ckpt, train, f"rank {rank}")
        sample(g, out(applied, 0), out(applied, 1), out(ckpt, 2), SCENES["forest"], f"lora_rank_sweep/rank{rank}",
               f"rank {rank}")
    return WorkflowSpec("lora_rank_sweep", "LoRA rank sweep", """\
# LoRA rank sweep

Five LoRAs of the same subject at ranks 4, 8, 16, 32 and 64 (unet_lr 1e-4, 800 steps), each
applied at scale 1 and sampled with the same prompt and seed.

**Try:** the sweep at unet_lr 2e-5 and 2e-4 as well (change all five LoRA Train nodes).
Identical settings reuse the saved LoRA instead of training again.

**What to look for:** small ranks learn the face more slowly but keep the prompt's scene; large
ranks learn faster and overfit sooner. The file size grows in proportion to the rank.
""", g.nodes)


def dreambooth_vs_lora() -> WorkflowSpec:
    g = Graph()
    subj = subject(g)
    ckpt = g.add("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=CHECKPOINT)
    db = dreambooth_train(g, subj, "DreamBooth Train", "sks_woman_db", unet_lr=4e-6)
    lora = lora_train(g, subj, "LoRA Train", "sks_woman_lora", rank=16, text_encoder_lr=1e-5)
    applied = apply_lora(g, ckpt, lora, "LoRA")
    for scene in ("beach", "moon"):
        sample(g, out(db, 0), out(db, 1), out(db, 2), SCENES[scene], f"dreambooth_vs_lora/dreambooth_{scene}",
               f"DreamBooth {scene}")
        sample(g, out(applied, 0), out(applied, 1), out(ckpt, 2), SCENES[scene], f"dreambooth_vs_lora/lora_{scene}",
               f"LoRA {scene}")
    return WorkflowSpec("dreambooth_vs_lora", "DreamBooth vs LoRA", """\
# DreamBooth vs LoRA, side by side

The same subject photos, prompts and seeds: a full DreamBooth fine-tune (unet_lr 4e-6, prior
preservation) against a rank-16 LoRA (UNet 1e-4, text encoder 1e-5). Images are saved as
dreambooth_vs_lora/dreambooth_* and dreambooth_vs_lora/lora_*.

**What to look for:** likeness, how much of the prompt's scene survives, and cost: the DreamBooth
checkpoint is 2 GB, the LoRA a few MB.
""", g.nodes)


def lora_scale_grid() -> WorkflowSpec:
    g = Graph()
    subj = subject(g)
    ckpt = g.add("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=CHECKPOINT)
    train = lora_train(g, subj, "LoRA Train", "sks_woman_lora_te", text_encoder_lr=1e-5)
    grid = g.add("LoRAScaleGrid", "LoRA Scale x CFG Grid", model=out(ckpt, 0), clip=out(ckpt, 1), vae=out(ckpt, 2),
                 lora_name=FROM_INPUT, positive=SCENES["beach"], negative=NEGATIVE, seed=123, steps=30,
                 sampler_name="euler_ancestral", scheduler="normal", width=512, height=512,
                 unet_scales="0, 0.5, 1.0", text_encoder_scales="0, 0.5, 1.0", cfg_values="5, 7.5, 10",
                 lora=out(train, 0))
    g.add("SaveImage", "Save grid", images=out(grid, 0), filename_prefix="lora_scale_grid/grid")
    return WorkflowSpec("lora_scale_grid", "LoRA scale x guidance grid", """\
# LoRA: UNet scale x text-encoder scale x guidance

One LoRA trained on the UNet and the text encoder, then sampled for every combination of UNet
scale (0, 0.5, 1), text-encoder scale (0, 0.5, 1) and CFG (5, 7.5, 10) at the fixed seed 123:
27 images in one labelled grid (rows: scale pairs, columns: CFG).

**What to look for:** the UNet scale carries the likeness, the text-encoder scale how strongly
"sks" means your subject; high CFG with both at 1 overcooks. Edit the lists on the grid node to
zoom in (e.g. UNet 0.6, 0.8, 1.0).
""", g.nodes)


def lora_te_lr_scheduler() -> WorkflowSpec:
    g = Graph()
    subj = subject(g)
    ckpt = g.add("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=CHECKPOINT)
    for scheduler in ("constant", "linear"):
        train = lora_train(g, subj, f"LoRA Train ({scheduler})", f"sks_woman_te_{scheduler}", steps=1000,
                           unet_lr=3e-4, text_encoder_lr=1e-5, lr_scheduler=scheduler)
        save_loss(g, train, f"lora_te_lr_scheduler/loss_{scheduler}", scheduler, 2)
        applied = apply_lora(g, ckpt, train, scheduler)
        sample(g, out(applied, 0), out(applied, 1), out(ckpt, 2), SCENES["street"],
               f"lora_te_lr_scheduler/{scheduler}", scheduler)
    return WorkflowSpec("lora_te_lr_scheduler", "LoRA text-encoder lr and scheduler", """\
# LoRA: text-encoder learning rate and scheduler

UNet lr 3e-4 with the text encoder trained at 1e-5, once with a constant learning rate and once
decaying linearly to 0, 1000 steps each. Both loss curves are saved.

**Try:** steps 1000 to 5000 (a longer constant run overfits; the linear decay settles), and
text_encoder_lr 0 to see what training the text encoder adds.
""", g.nodes)


def captioned_lora() -> WorkflowSpec:
    g = Graph()
    subj = subject(g, caption_mode="sidecar .txt", title="Load Subject Images (captions)")
    ckpt = g.add("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=CHECKPOINT)
    train = lora_train(g, subj, "LoRA Train", "sks_woman_captioned", text_encoder_lr=1e-5)
    grid = g.add("LoRAScaleGrid", "Guidance sweep", model=out(ckpt, 0), clip=out(ckpt, 1), vae=out(ckpt, 2),
                 lora_name=FROM_INPUT, positive="a photo of sks woman face wearing a red hat, smiling",
                 negative=NEGATIVE, seed=123, steps=30, sampler_name="euler_ancestral", scheduler="normal",
                 width=512, height=512, unet_scales="1.0", text_encoder_scales="1.0", cfg_values="9, 12, 15",
                 lora=out(train, 0))
    g.add("SaveImage", "Save grid", images=out(grid, 0), filename_prefix="captioned_lora/grid")
    g.add("PreviewImage", "Caption report: see the subject node's report output", images=out(subj, 1))
    return WorkflowSpec("captioned_lora", "Captioned LoRA", """\
# LoRA with per-image captions

Each photo in input/my_subject/ gets its caption from a .txt file of the same name
(photo01.jpg -> photo01.txt), e.g. "a photo of sks woman face, wearing glasses, outdoors". Captions
that lack "sks woman" get the instance prompt put in front; the subject node's report lists
missing, empty and orphan caption files.

**What to look for:** captions let attributes (glasses, hats, backgrounds) be prompted away
instead of baked into the subject. Guidance 9, 12 and 15 are compared in one grid.
""", g.nodes)


def canny_controlnet_portrait() -> WorkflowSpec:
    g = Graph()
    subj = subject(g)
    ckpt = g.add("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=CHECKPOINT)
    train = lora_train(g, subj, "LoRA Train", "sks_woman_lora_te", text_encoder_lr=1e-5)
    applied = apply_lora(g, ckpt, train, "subject")
    pos = g.add("CLIPTextEncode", "Prompt", text="an oil painting portrait of sks woman face, renaissance style",
                clip=out(applied, 1))
    neg = g.add("CLIPTextEncode", "Negative", text=NEGATIVE, clip=out(applied, 1))
    reference = g.add("LoadImage", "Reference painting", image=REFERENCE_IMAGE)
    controlnet = g.add("ControlNetLoader", "Load ControlNet (Canny)", control_net_name=CONTROLNET)
    canny = g.add("CannyControl", "Canny ControlNet", image=out(reference), low_threshold=100, high_threshold=200,
                  blur=0, auto_threshold=False, control_net=out(controlnet), positive=out(pos), negative=out(neg),
                  strength=0.8, start_percent=0.0, end_percent=0.8, vae=out(ckpt, 2))
    g.add("SaveImage", "Save edges", images=out(canny, 2), filename_prefix="canny_portrait/edges")
    sample(g, out(applied, 0), None, out(ckpt, 2), "", "canny_portrait/portrait", "portrait",
           conditioning=(out(canny, 0), out(canny, 1)))
    return WorkflowSpec("canny_controlnet_portrait", "Canny ControlNet portrait", """\
# Canny ControlNet: a portrait of the subject in a painting's composition

The edges of a reference painting (input/reference_painting.png) steer a portrait of the subject
(the LoRA on the checkpoint). Needs control_v11p_sd15_canny.safetensors in models/controlnet.

**Try:** low/high thresholds (OpenCV units 0-255; lower finds more edges) or auto_threshold;
strength 0.5-1.0; end_percent below 1 lets the last steps refine details freely. The edge map is
saved next to the portrait.
""", g.nodes, needs={REFERENCE_IMAGE: "image"})


def face_crop_prior_preservation() -> WorkflowSpec:
    g = Graph()
    subj = subject(g, crop_mode="face")
    train = dreambooth_train(g, subj, "DreamBooth Train", "sks_woman_db_face", steps=1500, unet_lr=2e-6,
                             class_images=150)
    save_loss(g, train, "face_crop_prior/loss", "DreamBooth", 4)
    g.add("PreviewImage", "Face crops (what is trained on)", images=out(subj, 1))
    sample(g, out(train, 0), out(train, 1), out(train, 2), "a portrait photo of sks woman face, studio lighting",
           "face_crop_prior/portrait", "portrait", width=768, height=1024)
    return WorkflowSpec("face_crop_prior_preservation", "Face crop + prior preservation", """\
# Face crop + prior preservation, 768x1024

15 or more photos, each cropped square around the detected face (the preview shows the exact
crops; photos without a detectable face are centre-cropped and listed in the report), DreamBooth
with 150 class images of "a photo of woman face" generated by the base model, and a 768x1024
portrait.

**What to look for:** the loss curve's prior (class) part should stay flat while the instance
part falls; if the prior loss climbs, the model is forgetting the class: lower unet_lr or raise
prior_loss_weight.
""", g.nodes)


def bucketed_masked_lora() -> WorkflowSpec:
    g = Graph()
    subj = subject(g, crop_mode="bucket", title="Load Subject Images (buckets, face mask)", loss_mask="face")
    ckpt = g.add("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=CHECKPOINT)
    train = lora_train(g, subj, "LoRA Train (masked loss)", "sks_woman_buckets_masked", text_encoder_lr=1e-5,
                       batch_size=2, unmasked_weight=0.1)
    g.add("PreviewImage", "Bucket crops (what is trained on)", images=out(subj, 1))
    g.add("MaskPreview", "Loss masks (white counts)", mask=out(subj, 3))
    save_loss(g, train, "buckets_masked/loss", "LoRA", 2)
    applied = apply_lora(g, ckpt, train, "subject")
    sample(g, out(applied, 0), out(applied, 1), out(ckpt, 2), "a full-length photo of sks woman face walking on a "
           "beach, sunset", "buckets_masked/full_length", "full length 512x768", width=512, height=768)
    sample(g, out(applied, 0), out(applied, 1), out(ckpt, 2), "a photo of sks woman face in a forest, autumn",
           "buckets_masked/landscape", "landscape 768x512", width=768, height=512)
    return WorkflowSpec("bucketed_masked_lora", "Aspect-ratio buckets + masked loss", """# Aspect-ratio buckets and a masked loss

Portrait and landscape photos keep their shape: crop_mode **bucket** puts each photo in the
bucket nearest its aspect ratio (at 512: 512x512, 448x576, 384x576 = 2:3, 384x640 and their
turns; about the same area, so the same memory), cutting off at most a sliver instead of the
square crop's third of a full-length photo. Batches (batch size 2 here) are drawn within one
bucket. The preview shows the exact crops, each centred on a white canvas of the largest size.

loss_mask **face** weights the loss with a soft-edged box around each detected face: LoRA Train's
unmasked_weight 0.1 lets the background count a tenth, so the LoRA learns the person, not the
rooms the photos were taken in. The mask preview shows each mask (white counts); photos with no
detectable face count everywhere and are listed in the report. For other subjects set
loss_mask to **mask** and paint masks (white = subject) in input/my_subject/masks/ with the
photos' names, or connect a MASK batch.

**What to look for:** the full-length 512x768 image keeps the whole figure and the 768x512 one
does not stretch; backgrounds follow the prompt instead of the training photos' rooms. Try
unmasked_weight 0 (only the face is learned) and 1 (the mask has no effect).
""", g.nodes)


def scored_seeds(g: Graph, ckpt: str, scorer: str, subj: str, lora, label: str, prompt: str, class_prompt: str,
                 prefix: str, unet_scale=1.0, te_scale=1.0) -> str:
    """A LoRA applied at the given scales, 4 seeds in one batch, saved and scored by Subject Fidelity
    (its table saved too): the number to compare runs by is the average over the seeds."""
    applied = g.add("ApplyLoRAScaled", f"Apply LoRA: {label}", model=out(ckpt, 0), clip=out(ckpt, 1),
                    lora_name=FROM_INPUT, unet_scale=unet_scale, text_encoder_scale=te_scale, lora=lora)
    pos = out(g.add("CLIPTextEncode", f"Prompt: {label}", text=prompt, clip=out(applied, 1)))
    neg = out(g.add("CLIPTextEncode", f"Negative: {label}", text=NEGATIVE, clip=out(applied, 1)))
    latent = g.add("EmptyLatentImage", f"Latent: {label}, 4 seeds", width=512, height=512, batch_size=4)
    sampler = g.add("KSampler", f"Sampler: {label}", model=out(applied, 0), positive=pos, negative=neg,
                    latent_image=out(latent), seed=123, steps=30, cfg=7.5, sampler_name="euler_ancestral",
                    scheduler="normal", denoise=1.0)
    decoded = g.add("VAEDecode", f"Decode: {label}", samples=out(sampler), vae=out(ckpt, 2))
    g.add("SaveImage", f"Save: {label}", images=out(decoded), filename_prefix=prefix)
    scored = g.add("SubjectFidelity", f"Subject Fidelity: {label}", images=out(decoded),
                   fidelity_models=out(scorer), prompts=class_prompt, subject=out(subj))
    return g.add("SaveImage", f"Save: fidelity table, {label}", images=out(scored, 4),
                 filename_prefix=f"{prefix}_fidelity")


def scored_lora_train(g: Graph, subj: str, scorer: str, title: str, output_name: str, **options) -> str:
    """LoRA Train that scores every sample round and keeps a step file at each, so that its best
    step (output 4, ``best_lora``) can be applied."""
    train = lora_train(g, subj, title, output_name, **options)
    inputs = g.nodes[train]["inputs"]
    inputs.update(fidelity_models=out(scorer), save_every=inputs["sample_every"], keep_last=2)
    return train


def lora_scale_by_the_numbers() -> WorkflowSpec:
    g = Graph()
    subj = subject(g)
    ckpt = g.add("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=CHECKPOINT)
    scorer = g.add("LoadFidelityModels", "Load Fidelity Models", dino_model=DINO_MODEL, clip_model=CLIP_MODEL)
    train = scored_lora_train(g, subj, scorer, "LoRA Train (scored)", "sks_woman_lora_scored", text_encoder_lr=1e-5)
    best = out(train, 4)  # best_lora
    grid = g.add("LoRAScaleGrid", "Scored scale grid (best step)", model=out(ckpt, 0), clip=out(ckpt, 1),
                 vae=out(ckpt, 2), lora_name=FROM_INPUT, positive=SCENES["beach"], negative=NEGATIVE, seed=123,
                 steps=30, sampler_name="euler_ancestral", scheduler="normal", width=512, height=512,
                 unet_scales="0, 0.6, 0.8, 1.0", text_encoder_scales="0.5, 1.0", cfg_values="7.5",
                 lora=best, fidelity_models=out(scorer), subject=out(subj), fidelity_prompt=BEACH_CLASS)
    g.add("SaveImage", "Save scored grid", images=out(grid, 0), filename_prefix="lora_scale_by_the_numbers/grid")
    scored_seeds(g, ckpt, scorer, subj, best, "chosen scales", SCENES["beach"], BEACH_CLASS,
                 "lora_scale_by_the_numbers/chosen", unet_scale=0.8)
    return WorkflowSpec("lora_scale_by_the_numbers", "Choosing the step and the scales by the numbers", f"""\
# Choosing the step and the LoRA scales by the numbers

The DreamBooth paper's three scores, computed in the graph: **DINO** and **CLIP-I** (how close
an image is to your photos: identity) and **CLIP-T** (how well it follows the prompt). The
paper's DreamBooth on Stable Diffusion scored 0.668 / 0.803 / 0.305, and real photos of one
subject against each other 0.774 / 0.885 (DINO / CLIP-I).

1. **The step:** LoRA Train scores every sample round (every 100 steps) and keeps a step file
   at each. Its live chart draws the three scores; the best step (highest DINO while CLIP-T
   stays within 0.02 of the base model's) comes out as `best_lora`.
2. **The scales:** the best step's LoRA at UNet scale 0, 0.6, 0.8, 1 x text-encoder scale
   0.5, 1 (seed 123), each cell labelled D(INO) / I (CLIP-I) / T (CLIP-T). Pick the scales
   where DINO is high and CLIP-T has not dropped below the UNet-0 row's: beyond that the LoRA
   overrides the prompt.
3. **Check:** the chosen scales (0.8 / 1.0: set them to your pick) on 4 seeds, scored by
   Subject Fidelity: the average over seeds is the number to compare runs by.

**Needs** two model folders in `models/subject_eval/`: `{DINO_MODEL}` (facebook/dino-vits16) and
`{CLIP_MODEL}` (openai/clip-vit-base-patch32), with model.safetensors (see README). CLIP-T is
scored against "{BEACH_CLASS}": the prompt with the class noun instead of "sks".
""", g.nodes)


def lora_rank_sweep_scored() -> WorkflowSpec:
    g = Graph()
    subj = subject(g)
    ckpt = g.add("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=CHECKPOINT)
    scorer = g.add("LoadFidelityModels", "Load Fidelity Models", dino_model=DINO_MODEL, clip_model=CLIP_MODEL)
    for rank in (4, 16, 64):
        train = scored_lora_train(g, subj, scorer, f"LoRA Train rank {rank} (scored)", f"sks_woman_rank{rank}_scored",
                                  rank=rank)
        scored_seeds(g, ckpt, scorer, subj, out(train, 4), f"rank {rank}, best step", SCENES["forest"], FOREST_CLASS,
                     f"lora_rank_sweep_scored/rank{rank}")
    return WorkflowSpec("lora_rank_sweep_scored", "LoRA rank sweep by the numbers", f"""\
# LoRA rank sweep, by the numbers

Three LoRAs of the same subject at ranks 4, 16 and 64 (unet_lr 1e-4, 800 steps). Each LoRA
Train scores its sample rounds (every 100 steps) with the DreamBooth paper's three numbers,
draws them on its live chart and keeps a step file at each round; its best step (highest DINO
while CLIP-T stays within 0.02 of the base model's) is applied at scale 1 and drawn on 4 seeds,
and **Subject Fidelity** scores those 4 images: one DINO / CLIP-I / CLIP-T row per rank, shown
in the node and saved as lora_rank_sweep_scored/rank*_fidelity.

**Reading it:** DINO and CLIP-I say how much the images look like your photos (the paper's
DreamBooth on Stable Diffusion: 0.668 / 0.803; real photos against each other: 0.774 / 0.885),
CLIP-T how well they follow the prompt (0.305). Take the smallest rank whose DINO is as high as
the larger ranks' while its CLIP-T holds: a larger rank only adds file size and overfits sooner.
The best step of each rank is in its LoRA Train's log and chart.

**Try:** the same sweep at unet_lr 2e-5 and 2e-4 (change the three LoRA Train nodes and their
output names): together with the ranks, a learning-rate x rank table.

**Needs** `{DINO_MODEL}` (facebook/dino-vits16) and `{CLIP_MODEL}`
(openai/clip-vit-base-patch32) in `models/subject_eval/` (see README). CLIP-T is scored against
"{FOREST_CLASS}": the prompt with the class noun instead of "sks".
""", g.nodes)


ALL = (dreambooth_lr_sweep, lora_rank_sweep, dreambooth_vs_lora, lora_scale_grid, lora_te_lr_scheduler,
       captioned_lora, canny_controlnet_portrait, face_crop_prior_preservation, lora_scale_by_the_numbers,
       lora_rank_sweep_scored, bucketed_masked_lora)


def specs() -> list[WorkflowSpec]:
    return [make() for make in ALL]


# -- making any of them tiny -----------------------------------------------------------------------------

SMALL = {
    "LoadSubjectImages": {"resolution": 64},
    # Samples and validation off: the runs prove the graphs; tests/test_server_live.py proves watching.
    # One step each: the runs prove that every graph wires up and runs, not what training does.
    "LoRATrain": {"steps": 1, "batch_size": 1, "precision": "fp32", "sample_every": 0, "validate_every": 0},
    "DreamBoothTrain": {"steps": 1, "class_images": 2, "class_steps": 1, "optimizer": "adafactor",
                        "precision": "fp32", "gradient_checkpointing": False, "sample_every": 0, "validate_every": 0},
    "KSampler": {"steps": 1},
    "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
    # two values per axis: every cell patches the full UNet again; two show the layout as well as three
    "LoRAScaleGrid": {"steps": 1, "width": 64, "height": 64, "unet_scales": "0, 1", "text_encoder_scales": "0, 1",
                      "cfg_values": "5, 10"},
    "LoadFidelityModels": {"dino_model": "dino-random-tiny", "clip_model": "clip-random-tiny"},  # placeholder.py
}


def small_overrides(prompt: dict, checkpoint: str, controlnet: str, subject_folder: str,
                    reference_image: str) -> list[str]:
    """``--set`` options that run an API prompt in seconds on the random test models (by node id)."""
    sets = []
    for node_id, node in prompt.items():
        kind, inputs = node["class_type"], node["inputs"]
        values = dict(SMALL.get(kind, {}))
        if "ckpt_name" in inputs:
            values["ckpt_name"] = checkpoint
        if kind == "ControlNetLoader":
            values["control_net_name"] = controlnet
        if kind == "LoadSubjectImages":
            values["folder"] = subject_folder
            if inputs.get("crop_mode") == "bucket":  # 192 px has non-square buckets (128x256, 256x128); 64 does not
                values["resolution"] = 192
        if kind == "LoadImage":
            values["image"] = reference_image
        if kind == "LoRATrain" and "fidelity_models" in inputs:  # scoring needs sample rounds
            values.update(sample_every=1, sample_steps=1, save_every=1)
        sets += [f"{node_id}.{name}={_json(value)}" for name, value in values.items() if name in inputs]
    return sets


def _json(value) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)
