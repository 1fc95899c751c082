"""CannyControl: OpenCV Canny edges of an image steering sampling through a ControlNet."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..trainers.control.edges import CannySettings, canny_edges, to_uint8
from .bridge import CATEGORY

log = logging.getLogger(__name__)


def edge_settings(low_threshold, high_threshold, blur, auto_threshold) -> CannySettings:
    return CannySettings(low_threshold=low_threshold, high_threshold=high_threshold, blur=blur,
                         auto_threshold=auto_threshold)


class CannyControl(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CannyControl",
            display_name="Canny ControlNet (OpenCV thresholds)",
            category=CATEGORY,
            description="Finds edges with OpenCV's Canny (thresholds 0-255, as in every Canny tutorial) and "
                        "applies them through a Canny ControlNet to the positive and negative conditioning "
                        "(ComfyUI's own ControlNet application). Also outputs the edge map.",
            inputs=[
                io.Image.Input("image", tooltip="Reference image (or batch) whose edges steer the composition."),
                io.Int.Input("low_threshold", default=100, min=0, max=255, step=1,
                             tooltip="Canny lower hysteresis threshold, OpenCV units (0-255). Weaker "
                                     "gradients are dropped."),
                io.Int.Input("high_threshold", default=200, min=0, max=255, step=1,
                             tooltip="Canny upper threshold, OpenCV units (0-255). Gradients above it always "
                                     "start an edge. Must be >= low_threshold."),
                io.Int.Input("blur", default=0, min=0, max=31, step=1,
                             tooltip="Gaussian pre-blur kernel size to suppress texture edges: 0 = off, "
                                     "else odd 3-31."),
                io.Boolean.Input("auto_threshold", default=False,
                                 tooltip="Ignore the thresholds and derive them per image from the median "
                                         "grey level m: low = 0.67 m, high = 1.33 m (clipped to 0-255)."),
                io.ControlNet.Input("control_net", tooltip="A Canny ControlNet from Load ControlNet Model."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning to steer."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (gets the same control)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="ControlNet strength; 0 leaves the conditioning unchanged."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the sampling at which the control starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the sampling at which the control ends."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional VAE, needed only by ControlNets that take latent hints."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="Positive conditioning with the control."),
                io.Conditioning.Output(display_name="negative", tooltip="Negative conditioning with the control."),
                io.Image.Output(display_name="edges",
                                tooltip="The edge map: white edges on black, same size as the input."),
            ],
        )

    @classmethod
    def validate_inputs(cls, low_threshold, high_threshold, blur) -> bool | str:
        # Naming these turns off ComfyUI's own min/max check for them: CannySettings re-checks all.
        try:
            edge_settings(low_threshold, high_threshold, blur, auto_threshold=False)
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, image, low_threshold, high_threshold, blur, auto_threshold, control_net, positive, negative,
                strength, start_percent, end_percent, vae=None) -> io.NodeOutput:
        import nodes as comfy_nodes  # ComfyUI's nodes.py (this pack's package is not on sys.path)

        settings = edge_settings(low_threshold, high_threshold, blur, auto_threshold)
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent})")
        edges, used = canny_edges(to_uint8(image.cpu().numpy()), settings)
        if auto_threshold:
            log.info("Canny auto thresholds per image: %s", used)
        edge_image = torch.from_numpy(edges).float().div(255.0).unsqueeze(-1).repeat(1, 1, 1, 3)
        positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, control_net, edge_image, strength, start_percent, end_percent, vae=vae)
        return io.NodeOutput(positive, negative, edge_image)
