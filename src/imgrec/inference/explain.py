"""Why the model answered: Grad-CAM heatmaps over the images (``imgrec explain``, ``predict
--explain``, the report's most confident mistakes, the server's ``/explain``).

Grad-CAM (Selvaraju et al., 2017): the gradient of one class's logit with respect to the last
feature map, averaged over its positions, weights that map's channels; their weighted sum,
kept where positive, says where the evidence for the class lies. For a timm CNN the feature map
is ``forward_features``' output (the last convolutional stage); for a timm ViT it is the patch
tokens entering the last block, laid out on their grid (a gradient-weighted token map; the
class and register tokens are left out); for any other module, the output of its last ``Conv2d``. The map
is upsampled to the input, scaled to [0, 1] per image and drawn over the image the model saw
(after the eval resize and crop).

The PyTorch model runs this in float32 with gradients, whichever backend the classifier predicts
with: an exported model has no gradients to give.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

HEATMAP_ALPHA = 0.45  # the heatmap's weight over the image


def vit_grid(model: torch.nn.Module, tokens: int) -> tuple[int, int, int] | None:
    """(prefix tokens, grid rows, grid columns) of a timm ViT whose blocks see ``tokens`` tokens, else None."""
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None or not hasattr(model, "blocks"):
        return None
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    patches = tokens - prefix
    if grid is not None and grid[0] * grid[1] == patches:
        return prefix, grid[0], grid[1]
    side = int(round(patches**0.5))
    if side * side != patches:
        raise ValueError(f"cannot lay {patches} patch tokens on a grid: pass a timm ViT whose patch_embed has grid_size")
    return prefix, side, side


def last_conv(model: torch.nn.Module) -> torch.nn.Module:
    """The last ``Conv2d`` registered in ``model`` (a custom module's Grad-CAM layer)."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d and no forward_features: there is no feature map to explain")
    return convs[-1]


def gradcam(model: torch.nn.Module, inputs: torch.Tensor, classes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(heatmaps [B, H, W] in [0, 1] at the input's size, logits [B, C]) of ``model`` on the
    normalised batch ``inputs``; each heatmap for ``classes[i]``, or the top class where None."""
    was_training = model.training
    model.eval()
    inputs = inputs.float().detach()
    try:
        with torch.enable_grad():
            activation, logits = _forward(model, inputs)
            targets = logits.argmax(dim=1) if classes is None else torch.as_tensor(classes, device=logits.device)
            chosen = logits.gather(1, targets[:, None]).sum()
            (gradients,) = torch.autograd.grad(chosen, activation)
    finally:
        model.train(was_training)
    feature_map, gradients = as_map(model, activation.detach()), as_map(model, gradients)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * feature_map).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return cam / peak, logits.detach()


def _forward(model: torch.nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the activation Grad-CAM weighs, logits): a timm CNN's last stage; a timm ViT's tokens as its
    last block sees them (after its first norm: the class token's answer still depends on them
    there, through that block's attention); else the last Conv2d's output."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head") and getattr(model, "num_prefix_tokens", None) is None:
        feature_map = model.forward_features(inputs)
        return feature_map, model.forward_head(feature_map)
    layer = model.blocks[-1].norm1 if getattr(model, "num_prefix_tokens", None) is not None and hasattr(model, "blocks") else last_conv(model)
    captured: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, output: captured.__setitem__("activation", output))
    try:
        logits = model(inputs)
    finally:
        handle.remove()
    return captured["activation"], logits


def as_map(model: torch.nn.Module, activation: torch.Tensor) -> torch.Tensor:
    """``activation`` as [B, C, h, w]: a ViT's patch tokens on their grid, a feature map as it is."""
    if activation.ndim == 4:
        channels = getattr(model, "num_features", None)
        if channels is not None and activation.shape[-1] == channels and activation.shape[1] != channels:  # NHWC stages (Swin, MambaOut)
            return activation.permute(0, 3, 1, 2)
        return activation
    grid = vit_grid(model, activation.shape[1]) if activation.ndim == 3 else None
    if grid is None:
        raise ValueError(f"{type(model).__name__} gives features of shape {tuple(activation.shape)}, not a map or ViT tokens on a grid: Grad-CAM cannot place them on the image")
    prefix, rows, columns = grid
    return activation[:, prefix:].transpose(1, 2).reshape(activation.shape[0], activation.shape[2], rows, columns)


def overlay(image: torch.Tensor, heatmap: torch.Tensor) -> np.ndarray:
    """The uint8 RGB image [3, H, W] with ``heatmap`` [H, W] in [0, 1] drawn over it (jet colours): HxWx3 uint8."""
    from matplotlib import colormaps

    colours = colormaps["jet"](heatmap.cpu().numpy())[..., :3]
    picture = image.permute(1, 2, 0).cpu().numpy().astype(np.float32) / 255.0
    blended = (1 - HEATMAP_ALPHA) * picture + HEATMAP_ALPHA * colours
    return (blended.clip(0, 1) * 255).round().astype(np.uint8)


def png_bytes(picture: np.ndarray) -> bytes:
    """An HxWx3 uint8 array as PNG bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def explain(classifier: Any, images: list[torch.Tensor], classes: str | list[str] | None = None, model: torch.nn.Module | None = None) -> list[dict[str, Any]]:
    """For each uint8 model-input image [3, H, W] (the classifier's eval transform applied): the
    class explained (``classes``: one name for all images, a name per image, or None for each
    image's top class), its probability, the heatmap and the overlay (HxWx3 uint8). ``model`` is
    the PyTorch module to differentiate (default the classifier's; a server passes a copy of its
    own, so that no hook sits on the module its batcher runs)."""
    names = [classes] * len(images) if isinstance(classes, str) else classes
    unknown = [name for name in names or [] if name not in classifier.classes]
    if unknown:
        raise ValueError(f"--class {unknown[0]!r} is not one of the model's classes: {', '.join(classifier.classes[:20])}{' ...' if len(classifier.classes) > 20 else ''}")
    model = (model if model is not None else classifier.model).to(classifier.device)  # the PyTorch model, fp32, whatever backend predicts
    batch = torch.stack(images)
    inputs = classifier.normalize(batch.to(classifier.device)).float()
    wanted = None if names is None else [classifier.classes.index(name) for name in names]
    heatmaps, logits = gradcam(model, inputs, wanted)
    probs = classifier.probabilities(logits.cpu())
    chosen = logits.argmax(dim=1).tolist() if wanted is None else wanted
    return [
        {"class": classifier.classes[c], "index": c, "prob": float(probs[i, c]), "heatmap": heatmaps[i].cpu(), "overlay": overlay(batch[i], heatmaps[i])}
        for i, c in enumerate(chosen)
    ]


def explain_files(
    classifier: Any, paths: list[str | os.PathLike], out: str | os.PathLike, classes: str | list[str] | None = None, batch_size: int = 16
) -> list[dict[str, Any]]:
    """``explain`` for image files (``classes``: one for all, one per path, or None), writing
    OUT/<name>.png for each; unreadable files get an error row."""
    from imgrec.data.decode import BadImageError, load_sample

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_path = [classes] * len(paths) if classes is None or isinstance(classes, str) else list(classes)
    rows: list[dict[str, Any]] = []
    used: set[Path] = set()
    for start in range(0, len(paths), batch_size):
        good = []
        for path, name in zip(paths[start : start + batch_size], per_path[start : start + batch_size]):
            try:
                good.append((path, name, load_sample(path, classifier.transform)))
            except BadImageError as exc:
                rows.append({"source": str(path), "error": exc.reason})
        if not good:
            continue
        names = None if all(name is None for _, name, _ in good) else [name for _, name, _ in good]
        for (path, _, _), row in zip(good, explain(classifier, [t for _, _, t in good], names)):
            target = _free_name(out, Path(path).stem, used)
            target.write_bytes(png_bytes(row["overlay"]))
            rows.append({"source": str(path), "class": row["class"], "prob": row["prob"], "heatmap": str(target)})
    return rows


def _free_name(folder: Path, stem: str, used: set[Path]) -> Path:
    """FOLDER/STEM.png, or STEM-2.png... where images of the same name came from different folders
    in this call (an earlier call's file of the same name is replaced)."""
    target, n = folder / f"{stem}.png", 1
    while target in used:
        n += 1
        target = folder / f"{stem}-{n}.png"
    used.add(target)
    return target


__all__ = ["explain", "explain_files", "gradcam", "overlay", "png_bytes"]
