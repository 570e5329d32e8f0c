"""Writing the toy world (`uniperceiver_cli.data.toy.ToyWorld`) to disk in the real formats.

`write_toy_world` writes ImageFolder, COCO caption JSON, Karpathy JSON, JSON lines, VQA JSON lines,
WebDataset shards, Kinetics-style mp4 + annotation.json + CSV, MSVD-style caption JSON and a text
corpus, so demos and tests go through the real readers (`uniperceiver data toy --out DIR`).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from uniperceiver_cli.data.toy import MOTIONS, SHAPES, ToyWorld, class_folder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToyWorldSummary:
    """What `write_toy_world` wrote, with the options the real readers need.

    Attributes:
        out_dir: root folder.
        seed: world seed.
        image_size: image and frame side.
        num_images: images per split.
        num_videos: videos per split.
        frames_per_video: frames in each mp4.
        fps: frame rate of the mp4 files.
        image_classes: image class names (index order).
        video_classes: video class names (index order).
        paths: named paths (see `write_toy_world`).
    """

    out_dir: Path
    seed: int
    image_size: int
    num_images: dict[str, int]
    num_videos: dict[str, int]
    frames_per_video: int
    fps: float
    image_classes: tuple[str, ...]
    video_classes: tuple[str, ...]
    paths: dict[str, Path] = field(default_factory=dict)


def _split_counts(total: int) -> dict[str, int]:
    val = max(1, total // 10) if total >= 3 else 0
    test = val
    return {"train": total - val - test, "val": val, "test": test}


def _encode_png(pixels: Tensor) -> bytes:
    from torchvision.io import encode_png

    return bytes(encode_png(pixels).numpy().tobytes())


def encode_mp4(
    frames: Tensor,
    path: Path,
    fps: float,
    *,
    crf: int = 0,
    pixel_format: str = "yuv444p",
) -> None:
    """Write `(T, 3, H, W)` uint8 frames as an H.264 mp4 (TorchCodec, else PyAV).

    The defaults (full-resolution chroma, constant rate factor 0 = lossless in YUV) keep the
    decoded frames within a few grey levels of `frames` (only the RGB/YUV rounding remains), so
    the on-disk toy videos match the in-memory ones; `crf=18, pixel_format="yuv420p"` gives
    the usual lossy web-video settings instead.

    Args:
        frames: `(T, 3, H, W)` uint8, H and W even.
        path: the mp4 to write (parent folders are created).
        fps: frame rate.
        crf: x264 constant rate factor (0 = lossless, 18 = visually lossless, 23 = default).
        pixel_format: `yuv444p` (full chroma) or `yuv420p` (subsampled chroma).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from torchcodec.encoders import VideoEncoder

        VideoEncoder(frames, frame_rate=fps).to_file(
            str(path), codec="libx264", crf=crf, pixel_format=pixel_format
        )
        return
    except (ImportError, RuntimeError) as exc:
        logger.debug("TorchCodec cannot encode %s (%s); using PyAV", path, exc)
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.height, stream.width = int(frames.shape[2]), int(frames.shape[3])
        stream.pix_fmt = pixel_format
        stream.options = {"crf": str(crf)}
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(frame.permute(1, 2, 0).numpy(), format="rgb24")
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _coco_json(
    items: list[tuple[int, str, str, tuple[str, ...]]],
) -> dict[str, list[dict[str, object]]]:
    images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    for item_id, file_path, file_name, captions in items:
        images.append({"id": item_id, "file_path": file_path, "file_name": file_name})
        for cap in captions:
            annotations.append({"image_id": item_id, "id": len(annotations), "caption": cap})
    return {"images": images, "annotations": annotations}


def write_toy_world(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_images: int = 600,
    num_videos: int = 120,
    image_size: int = 32,
    frames_per_video: int = 16,
    fps: float = 30.0,
    num_sentences: int = 2000,
    images_per_shard: int = 100,
) -> ToyWorldSummary:
    """Write the toy world in the real on-disk formats (80/10/10 train/val/test splits).

    Layout under `out_dir` (keys of `ToyWorldSummary.paths` in brackets):

    * `images/<split>/<shape>/<split>_<i>.png` ImageFolder [`images`], `images/classes.txt`
      [`image_classes`];
    * `captions/captions_<split>.json` COCO-style JSON (`file_path` = `<split>/<shape>`, relative
      to `images/`) [`captions_<split>`]; `captions/dataset_toy.json` Karpathy JSON [`karpathy`];
      `captions/<split>.jsonl` JSON lines `{"image", "caption": [...]}` [`jsonl_<split>`];
    * `vqa/<split>.jsonl` VQA JSON lines `{"question_id", "image", "question", "answers",
      "scores"}` about the same images (image paths relative to `images/`) [`vqa_<split>`],
      `vqa/answers.txt` the answer vocabulary [`vqa_answers`];
    * `shards/train-<k>.tar` img2dataset-style WebDataset shards of the train images (`.png`,
      `.txt` first caption, `.json` all captions) [`shards`];
    * `videos/<subset>/<motion_label>/<name>.mp4` with subset `training`/`validation`/`testing`,
      `videos/annotation.json` (Kinetics layout) [`kinetics_annotations`],
      `videos/category_mapping.txt` [`category_mapping`], `videos/<split>.csv` (`path,label`)
      [`videos_<split>_csv`], `videos/classes.txt` [`video_classes`];
    * `video_captions/caption_toy_<split>_cocostyle.json` MSVD-style JSON whose `file_name` is the
      video path relative to `videos/` without `.mp4` [`video_captions_<split>`];
    * `text/corpus_<split>.txt` one line per sentence [`corpus_<split>`].

    Args:
        out_dir: folder to write into (created; existing files are overwritten).
        seed: world seed.
        num_images: images over all splits.
        num_videos: videos over all splits.
        image_size: image and frame side (even, >= 8; H.264 needs even sides).
        frames_per_video: frames per mp4.
        fps: frame rate written into the mp4 files.
        num_sentences: corpus lines over all splits.
        images_per_shard: train images per WebDataset shard.

    Returns:
        A `ToyWorldSummary`.
    """
    if image_size % 2:
        raise ValueError(
            f"expected an even image_size (H.264 needs even sides), found {image_size}"
        )
    root = Path(out_dir)
    world = ToyWorld(seed, image_size=image_size, num_frames=frames_per_video)
    paths: dict[str, Path] = {}
    image_counts = _split_counts(num_images)
    video_counts = _split_counts(num_videos)

    img_root = root / "images"
    cap_root = root / "captions"
    cap_root.mkdir(parents=True, exist_ok=True)
    img_root.mkdir(parents=True, exist_ok=True)
    (img_root / "classes.txt").write_text("\n".join(SHAPES) + "\n")
    paths["images"] = img_root
    paths["image_classes"] = img_root / "classes.txt"
    vqa_root = root / "vqa"
    vqa_root.mkdir(parents=True, exist_ok=True)
    (vqa_root / "answers.txt").write_text("\n".join(world.vqa_answers) + "\n")
    paths["vqa_answers"] = vqa_root / "answers.txt"
    karpathy_images: list[dict[str, object]] = []
    train_records: list[tuple[str, bytes, tuple[str, ...]]] = []
    next_id = 0
    for split, count in image_counts.items():
        coco_items: list[tuple[int, str, str, tuple[str, ...]]] = []
        jsonl_lines: list[str] = []
        vqa_lines: list[str] = []
        for i in range(count):
            pixels, scene = world.image(i, split)
            rel_dir = f"{split}/{scene.shape}"
            name = f"{split}_{i:05d}.png"
            (img_root / rel_dir).mkdir(parents=True, exist_ok=True)
            data = _encode_png(pixels)
            (img_root / rel_dir / name).write_bytes(data)
            coco_items.append((next_id, rel_dir, name, scene.captions))
            jsonl_lines.append(
                json.dumps({"image": f"{rel_dir}/{name}", "caption": list(scene.captions)})
            )
            question = world.vqa(i, split)
            vqa_lines.append(
                json.dumps(
                    {
                        "question_id": next_id,
                        "image": f"{rel_dir}/{name}",
                        "question": question.question,
                        "answers": list(question.answers),
                        "scores": list(question.scores),
                    }
                )
            )
            karpathy_images.append(
                {
                    "filepath": rel_dir,
                    "filename": name,
                    "imgid": next_id,
                    "split": split,
                    "sentences": [{"raw": c, "tokens": c.split()} for c in scene.captions],
                }
            )
            if split == "train":
                train_records.append((f"{i:09d}", data, scene.captions))
            next_id += 1
        path = cap_root / f"captions_{split}.json"
        path.write_text(json.dumps(_coco_json(coco_items)))
        paths[f"captions_{split}"] = path
        jsonl = cap_root / f"{split}.jsonl"
        jsonl.write_text("\n".join(jsonl_lines) + ("\n" if jsonl_lines else ""))
        paths[f"jsonl_{split}"] = jsonl
        vqa = vqa_root / f"{split}.jsonl"
        vqa.write_text("\n".join(vqa_lines) + ("\n" if vqa_lines else ""))
        paths[f"vqa_{split}"] = vqa
    karpathy = cap_root / "dataset_toy.json"
    karpathy.write_text(json.dumps({"dataset": "toy", "images": karpathy_images}))
    paths["karpathy"] = karpathy

    shard_root = root / "shards"
    shard_root.mkdir(parents=True, exist_ok=True)
    num_shards = max(1, -(-len(train_records) // images_per_shard))
    for k in range(num_shards):
        with tarfile.open(shard_root / f"train-{k:05d}.tar", "w") as tar:
            for key, data, caps in train_records[k * images_per_shard : (k + 1) * images_per_shard]:
                meta = json.dumps({"caption": caps[0], "captions": list(caps)}).encode()
                for suffix, blob in ((".png", data), (".txt", caps[0].encode()), (".json", meta)):
                    info = tarfile.TarInfo(key + suffix)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    paths["shards"] = shard_root / f"train-{{00000..{num_shards - 1:05d}}}.tar"

    vid_root = root / "videos"
    vcap_root = root / "video_captions"
    vid_root.mkdir(parents=True, exist_ok=True)
    vcap_root.mkdir(parents=True, exist_ok=True)
    motions = list(MOTIONS)
    (vid_root / "classes.txt").write_text("\n".join(motions) + "\n")
    (vid_root / "category_mapping.txt").write_text(
        "".join(f"{m}\t{i}\n" for i, m in enumerate(motions))
    )
    paths["video_classes"] = vid_root / "classes.txt"
    paths["category_mapping"] = vid_root / "category_mapping.txt"
    paths["videos"] = vid_root
    subsets = {"train": "training", "val": "validation", "test": "testing"}
    database: dict[str, dict[str, object]] = {}
    next_vid = 0
    for split, count in video_counts.items():
        csv_rows = ["path,label"]
        coco_items = []
        for i in range(count):
            frames, vscene = world.video(i, split)
            label_dir = class_folder(vscene.motion)
            name = f"{split}_{i:05d}"
            rel = f"{subsets[split]}/{label_dir}/{name}"
            encode_mp4(frames, vid_root / f"{rel}.mp4", fps)
            database[name] = {"subset": subsets[split], "annotations": {"label": label_dir}}
            csv_rows.append(f"{rel}.mp4,{vscene.motion}")
            coco_items.append((next_vid, "", rel, vscene.captions))
            next_vid += 1
        csv_path = vid_root / f"{split}.csv"
        csv_path.write_text("\n".join(csv_rows) + "\n")
        paths[f"videos_{split}_csv"] = csv_path
        vjson = _coco_json(coco_items)
        for img in vjson["images"]:
            img.pop("file_path")
        vpath = vcap_root / f"caption_toy_{split}_cocostyle.json"
        vpath.write_text(json.dumps(vjson))
        paths[f"video_captions_{split}"] = vpath
    annotation = vid_root / "annotation.json"
    annotation.write_text(json.dumps({"database": database}))
    paths["kinetics_annotations"] = annotation

    text_root = root / "text"
    text_root.mkdir(parents=True, exist_ok=True)
    for split, count in _split_counts(num_sentences).items():
        p = text_root / f"corpus_{split}.txt"
        p.write_text("".join(world.sentence(i, split) + "\n" for i in range(count)))
        paths[f"corpus_{split}"] = p

    logger.info(
        "wrote the toy world (seed %d): %d images, %d videos, %d sentences under %s",
        seed,
        num_images,
        num_videos,
        num_sentences,
        root,
    )
    return ToyWorldSummary(
        out_dir=root,
        seed=seed,
        image_size=image_size,
        num_images=image_counts,
        num_videos=video_counts,
        frames_per_video=frames_per_video,
        fps=fps,
        image_classes=SHAPES,
        video_classes=tuple(motions),
        paths=paths,
    )
