"""Aspect-ratio buckets and masked loss on the tiny model: a portrait photo trains at its own
aspect ratio with nothing of it cut off, batches never mix sizes, and the area outside a loss
mask gives no gradient at all when its weight is 0; the masks come from the face search, a MASK
batch or a masks/ folder, and are cropped as their photos are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.test_trainers_lora import make_subject, tiny  # noqa: F401 - tiny is a fixture
from tests.test_trainers_resume import FINGERPRINT, SavePoints, fresh
from trainers.data.images import (
    SubjectImageError,
    crop_photo,
    load_subject,
    photo_from_tensor,
    prepare_subject,
)
from trainers.data.subject import SubjectData, bucket_sizes, nearest_bucket
from trainers.training.callbacks import TrainingStopped
from trainers.training.config import DreamBoothTrainConfig, LoRATrainConfig
from trainers.training.dreambooth import train_dreambooth
from trainers.training.loop import (
    BucketStream,
    LoopModels,
    LoopSettings,
    draw_batch,
    prepare_training_set,
    shard_loss,
)
from trainers.training.lora import save_lora, train_lora
from trainers.training.state import newest_state

pytestmark = pytest.mark.trainers

PROMPT = "a photo of sks toy"
RED, BLUE, GREEN, YELLOW = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)


def framed_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Noise inside a 4-pixel frame of a different colour on each side: a crop that cuts any of
    the photo off loses a colour."""
    pixels = np.random.default_rng(seed).integers(60, 200, (height, width, 3), dtype=np.uint8)
    pixels[:4], pixels[-4:], pixels[:, :4], pixels[:, -4:] = RED, BLUE, GREEN, YELLOW
    return pixels


def test_buckets_are_about_the_square_s_area_and_a_photo_goes_to_the_nearest():
    for resolution in (320, 512, 768):
        for height, width in bucket_sizes(resolution):
            assert height % 64 == 0 and width % 64 == 0
            assert 0.8 * resolution ** 2 <= height * width <= resolution ** 2 and max(height, width) <= 2 * min(height, width)
    assert (576, 384) in bucket_sizes(512) and (384, 576) in bucket_sizes(512)  # 2:3 and 3:2 at 512
    assert nearest_bucket(900, 600, 512) == (576, 384)  # a 2:3 portrait
    assert nearest_bucket(1000, 1000, 512) == (512, 512)
    assert nearest_bucket(1000, 400, 512) == (640, 384)  # 5:2 goes to the tallest there is (5:3)


def test_a_2_3_photo_trains_at_a_2_3_latent_without_cropping_the_subject(tiny, tmp_path):  # noqa: F811
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(framed_photo(400, 600)).save(folder / "a_portrait.png")  # 2:3
    Image.fromarray(framed_photo(420, 630, seed=1)).save(folder / "b_portrait.png")  # 2:3, another size
    Image.fromarray(framed_photo(500, 500, seed=2)).save(folder / "c_square.png")
    load = load_subject(folder, PROMPT, resolution=320, crop_mode="bucket")
    subject = load.subject
    assert subject.bucketed and subject.sizes() == [(384, 256), (384, 256), (320, 320)]
    for image in subject.images:  # every side of the frame is still there: nothing was cut off
        pixels = (image.numpy() * 255).round()
        for side, colour in ((pixels[1], RED), (pixels[-2], BLUE), (pixels[:, 1], GREEN), (pixels[:, -2], YELLOW)):
            assert np.abs(side[8:-8] - colour).max() < 40
    assert "bucket 256x384 (whole image, not cropped)" in load.report()

    shapes = []
    hook = tiny.unet.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(args[0].shape)),
                                               with_kwargs=True)
    try:
        config = LoRATrainConfig(steps=4, rank=4, unet_lr=1e-3, batch_size=2, seed=5)
        result = train_lora(tiny, subject, config)
    finally:
        hook.remove()
    factor = 320 // result_latent_side(shapes)  # pixels per latent cell of this VAE
    portrait, square = (2, 4, 384 // factor, 256 // factor), (2, 4, 320 // factor, 320 // factor)
    # batches of 2 within one bucket (the lone square photo is paired with itself), 2:3 latents
    assert set(shapes) == {portrait, square} and shapes.count(portrait) >= 2
    path = save_lora(result, tmp_path / "a.safetensors")
    again = save_lora(train_lora(tiny, subject, config), tmp_path / "b.safetensors")
    assert again.read_bytes() == path.read_bytes()  # the same seed, the same file
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_enable_bucket"] == "True" and '"resolution": [256, 384], "count": 2' in meta["ss_bucket_info"]
    square_only = load_subject(folder, PROMPT, resolution=320, crop_mode="center").subject
    assert square_only.fingerprint() != subject.fingerprint()


def test_dreambooth_with_class_images_trains_a_bucketed_masked_subject_beside_square_class_images(tmp_path):
    # the subject's rows (1:2, masked) and the class images' (square) go through the UNet apart
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(framed_photo(150, 300, seed=i)).save(folder / f"tall{i}.png")
    subject = load_subject(folder, PROMPT, resolution=192, crop_mode="bucket", loss_mask="face").subject
    assert subject.sizes() == [(256, 128)] * 2 and len(subject.masks) == 2  # no face: all ones, reported
    classes = SubjectData(images=[torch.rand(192, 192, 3) for _ in range(2)], captions=["a photo of toy"] * 2,
                          instance_prompt=PROMPT, class_prompt="a photo of toy", resolution=192,
                          source_names=("c0.png", "c1.png"))
    shapes = []
    model = fresh()
    model.unet.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(args[0].shape)),
                                         with_kwargs=True)
    config = DreamBoothTrainConfig(steps=2, unet_lr=1e-5, class_images=2, batch_size=1, seed=3)
    result = train_dreambooth(model, subject, config, class_subject=classes)
    assert shapes == [(1, 4, 32, 16), (1, 4, 24, 24)] * 2
    assert all(np.isfinite(loss) for loss in result.history.prior_losses)


def result_latent_side(shapes: list[tuple[int, ...]]) -> int:
    return max(shape[-1] for shape in shapes if shape[-1] == shape[-2])


def test_bucket_batches_are_one_size_each_and_every_image_comes_once_an_epoch():
    buckets = [[0, 2, 5], [1, 3], [4]]
    stream = BucketStream(buckets, torch.Generator().manual_seed(0))
    size_of = {index: b for b, members in enumerate(buckets) for index in members}
    seen = []
    for _ in range(4):  # one epoch: runs of 2 -> 2 + 1 + 1 runs
        taken = stream.take(2).tolist()
        assert len({size_of[i] for i in taken}) == 1
        seen += taken
    assert set(seen) == set(range(6))
    again = BucketStream(buckets, torch.Generator().manual_seed(0))
    assert [again.take(2).tolist() for _ in range(4)] == [seen[i:i + 2] for i in range(0, 8, 2)]


def half_mask_subject(unmasked: float = 0.0) -> SubjectData:
    base = make_subject(count=2)
    masks = []
    for _ in base.images:
        mask = torch.zeros(64, 64)
        mask[:, :32] = 1.0  # the left half is the subject
        masks.append(mask)
    return SubjectData(images=base.images, captions=base.captions, instance_prompt=base.instance_prompt,
                       class_prompt=base.class_prompt, resolution=64, source_names=base.source_names, masks=masks)


@pytest.mark.parametrize("unmasked_weight", [0.0, 0.25])
def test_the_masked_out_region_gives_no_gradient_when_its_weight_is_0(tiny, unmasked_weight):  # noqa: F811
    subject = half_mask_subject()
    training_set = prepare_training_set(subject.pixels(), subject.captions, vae=tiny.vae,
                                        text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, flip=False,
                                        cache_latents=True, cache_text=True, masks=subject.masks,
                                        unmasked_weight=unmasked_weight)
    models = LoopModels(tiny.unet, tiny.vae, tiny.text_encoder, tiny.noise_scheduler)
    settings = LoopSettings.of(LoRATrainConfig(batch_size=2), None)
    drawn = draw_batch(models, [training_set], [BucketStream([[0, 1]], torch.Generator().manual_seed(0))], 2,
                       torch.Generator().manual_seed(1))
    predictions = []

    def keep(module, args, output):
        output.sample.retain_grad()
        predictions.append(output.sample)

    hook = tiny.unet.register_forward_hook(keep)
    try:
        loss, _ = shard_loss(models, [training_set], drawn, range(2), settings)
        loss.backward()
    finally:
        hook.remove()
        tiny.unet.zero_grad(set_to_none=True)
    gradient = predictions[0].grad
    width = gradient.shape[-1]
    left, right = gradient[..., : width // 2], gradient[..., width // 2:]
    assert left.abs().min() > 0  # every cell of the subject teaches
    if unmasked_weight == 0:
        assert torch.count_nonzero(right) == 0  # the background: exactly nothing
    else:
        ratio = right.abs().mean() / left.abs().mean()
        assert 0.1 < ratio < 0.6  # a quarter of the weight (the errors themselves differ)


def test_a_masked_lora_resumes_exactly_and_records_the_mask(tmp_path):
    subject = half_mask_subject()
    config = LoRATrainConfig(steps=4, rank=4, unet_lr=1e-2, unmasked_weight=0.0, seed=1)
    whole = train_lora(fresh(), subject, config)
    with pytest.raises(TrainingStopped):
        train_lora(fresh(), subject, config, SavePoints(tmp_path / "states", stop_after=3), save_every=2)
    state, _ = newest_state(tmp_path / "states", FINGERPRINT)
    resumed = train_lora(fresh(), subject, config, resume=state)
    assert all(torch.equal(resumed.state_dict[k], whole.state_dict[k]) for k in whole.state_dict)
    path = save_lora(whole, tmp_path / "masked.safetensors")
    again = save_lora(train_lora(fresh(), subject, config), tmp_path / "again.safetensors")
    assert again.read_bytes() == path.read_bytes()  # the same seed, the same file
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_masked_loss"] == "True" and meta["dbs.unmasked_weight"] == "0"
    plain = train_lora(fresh(), make_subject(count=2), LoRATrainConfig(steps=4, rank=4, unet_lr=1e-2, seed=1))
    assert plain.losses != whole.losses


def test_a_face_mask_is_a_soft_box_around_the_face_of_the_crop():
    from skimage import data

    photo = photo_from_tensor(torch.from_numpy(data.astronaut().astype(np.float32) / 255))
    load = prepare_subject([torch.from_numpy(data.astronaut().astype(np.float32) / 255)], ["astronaut"], PROMPT,
                           resolution=256, crop_mode="center", loss_mask="face")
    mask = load.subject.masks[0]
    crop = crop_photo(photo, "center", 256, find_face=True)
    x, y, w, h = crop.geometry.box_in_crop(crop.face)
    assert mask[int(y + h / 2), int(x + w / 2)] == 1  # the face counts fully
    assert mask[-1, -1] == 0 and mask[-1, 0] == 0  # the far corners not at all
    soft = mask[(mask > 0) & (mask < 1)]
    assert soft.numel() > 0.02 * mask.numel()  # with a soft edge between
    assert "loss mask face box" in load.report()


def test_masks_from_a_masks_folder_or_a_mask_batch_are_cropped_like_their_photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "masks").mkdir(parents=True)
    for i, (w, h) in enumerate([(300, 200), (200, 300)]):
        Image.fromarray(framed_photo(w, h, seed=i)).save(folder / f"p{i}.png")
        mask = np.zeros((h // 2, w // 2), dtype=np.uint8)  # half size, same aspect: the left half counts
        mask[:, : w // 4] = 255
        Image.fromarray(mask).save(folder / "masks" / f"p{i}.png")
    from_files = load_subject(folder, PROMPT, resolution=128, crop_mode="center", loss_mask="mask").subject
    for mask in from_files.masks:  # cropped as the photo: the centre square of a left-half mask
        assert mask.shape == (128, 128)
        assert mask[:, :60].min() > 0.99 and mask[:, 68:].max() < 0.01

    batch = [torch.from_numpy(np.asarray(Image.open(folder / "masks" / f"p{i}.png"), dtype=np.float32) / 255)
             for i in range(2)]
    from_batch = load_subject(folder, PROMPT, resolution=128, crop_mode="center", loss_mask="mask",
                              masks=batch).subject
    assert all(torch.equal(a, b) for a, b in zip(from_batch.masks, from_files.masks, strict=True))

    with pytest.raises(SubjectImageError, match="MASK batch has 1"):
        load_subject(folder, PROMPT, resolution=128, loss_mask="mask", masks=batch[:1])
    with pytest.raises(SubjectImageError, match="aspect ratio"):
        load_subject(folder, PROMPT, resolution=128, loss_mask="mask", masks=batch[::-1])
    (folder / "masks" / "p1.png").unlink()
    with pytest.raises(SubjectImageError, match=r"no mask for 1 photo\(s\) of 'photos' \(p1.png\)"):
        load_subject(folder, PROMPT, resolution=128, loss_mask="mask")
    with pytest.raises(SubjectImageError, match="loss mask must be one of"):
        load_subject(folder, PROMPT, resolution=128, loss_mask="background")


def test_an_exported_run_folder_keeps_the_buckets_and_masks_and_so_the_job_fingerprint(tmp_path):
    from trainers.runfile import write_run

    folder = tmp_path / "photos"
    (folder / "masks").mkdir(parents=True)
    for i, (w, h) in enumerate([(200, 400), (300, 300)]):
        Image.fromarray(framed_photo(w, h, seed=i)).save(folder / f"p{i}.png")
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[h // 4:, : w // 2] = 200
        Image.fromarray(mask).save(folder / "masks" / f"p{i}.png")
    subject = load_subject(folder, PROMPT, resolution=192, crop_mode="bucket", loss_mask="mask").subject
    run = write_run(tmp_path / "run", command="lora", processes=1, checkpoint=tmp_path / "model.safetensors",
                    tokenizer=None, subject=subject, config=LoRATrainConfig(unmasked_weight=0.5), output_name="out")
    import json

    options = json.loads(run.run_file.read_text())["options"]
    assert (options["crop_mode"], options["loss_mask"], options["unmasked_weight"]) == ("bucket", "mask", 0.5)
    again = load_subject(run.folder / options["images"], PROMPT, resolution=192, crop_mode=options["crop_mode"],
                         loss_mask=options["loss_mask"], caption_mode="sidecar .txt").subject
    assert again.sizes() == subject.sizes() == [(256, 128), (192, 192)]
    assert again.fingerprint() == subject.fingerprint()


def test_the_command_line_trains_buckets_with_mask_files_and_refuses_a_weight_without_masks(tmp_path, capsys,
                                                                                               tiny_checkpoint):
    from tests.support.paths import tokenizer_dir
    from tests.test_trainers_lora import run_cli

    checkpoint = tiny_checkpoint
    folder = tmp_path / "photos"
    (folder / "masks").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(framed_photo(120, 240, seed=i)).save(folder / f"tall{i}.png")
        mask = np.zeros((240, 120), dtype=np.uint8)
        mask[40:200, 20:100] = 255
        Image.fromarray(mask).save(folder / "masks" / f"tall{i}.png")
    output = tmp_path / "out.safetensors"
    argv = ["lora", "--checkpoint", str(checkpoint), "--images", str(folder), "--instance-prompt", PROMPT,
            "--output", str(output), "--tokenizer", str(tokenizer_dir()), "--resolution", "192", "--steps", "2",
            "--rank", "4", "--crop-mode", "bucket", "--sample-every", "0", "--validate-every", "0"]
    code, _, err = run_cli(argv + ["--unmasked-weight", "0"], capsys)
    assert code == 2 and "unmasked_weight=0 has no effect: the subject has no loss masks" in err
    assert not output.exists()
    code, _, err = run_cli(argv + ["--loss-mask", "mask", "--unmasked-weight", "0"], capsys)
    assert code == 0, err[-2000:]
    with safe_open(str(output), "pt") as handle:
        meta = handle.metadata()
    assert '"resolution": [128, 256], "count": 2' in meta["ss_bucket_info"] and meta["ss_masked_loss"] == "True"
