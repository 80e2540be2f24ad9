"""Deterministic tiny random vision-language models of real architectures, built offline.

``build(arch, out)`` writes a directory that ``AutoProcessor.from_pretrained`` and
``AutoModelForImageTextToText.from_pretrained`` load like a Hub checkpoint: the real model,
processor and tokenizer classes and chat template of the architecture, a byte-level BPE trained
on ``worker/data/corpus.txt``, and random weights seeded per parameter name, so that two builds
are byte-identical. Tests should call ``tiny_model_path(arch)``, which builds once and caches.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from worker import tiny_archs
from worker.tiny_archs import ARCHS, DATA, TEMPLATES, config_and_processor, train_tokenizer

SIZES = ("tiny", "smolvlm-256m")
TEXT_STD, VISION_STD = 0.25, 0.1  # init std at fan-in 64: big enough for varied greedy text
RARE_SCALE = 0.7  # output-row scale for EOS and lone UTF-8 bytes: rarer, yet not absent
_MODEL_SOURCES = (Path(__file__), Path(tiny_archs.__file__))  # every module defining the models


def _init_weights(model: Any, salt: str, silent: list[int], rare: list[int]) -> None:
    """Seed each parameter from ``salt`` and its name, independent of library init order.

    Norms start at 1, biases at 0, matrices at N(0, std) scaled down for fan-in above 64;
    IDEFICS' cross-attention gates (``alpha_*``) at 1 when its config says ``"ones"``.
    Output rows of ``silent`` ids (markers, embedding padding) are zeroed so greedy decoding
    never emits them; rows of ``rare`` ids (EOS, lone UTF-8 bytes, control characters) are
    shrunk, so a 20-token answer is seldom empty yet sometimes holds a split character.
    """
    import torch

    norms = {
        id(p)
        for m in model.modules()
        if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")
        for p in m.parameters(recurse=False)
    }
    open_gates = getattr(model.config, "alpha_initializer", None) == "ones"
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest = hashlib.sha256(f"{salt}/{name}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))
            if id(param) in norms:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif open_gates and name.rsplit(".", 1)[-1].startswith("alpha_"):
                param.fill_(1.0)
            elif param.ndim < 2:
                param.zero_()
            else:
                std = VISION_STD if "vision" in name or "visual" in name else TEXT_STD
                std *= min(1.0, (64 / param[0].numel()) ** 0.5)
                param.copy_(torch.randn(param.shape, generator=gen) * std)
        head = model.get_output_embeddings().weight
        head[rare] *= RARE_SCALE
        head[silent] = 0.0


def _model_and_processor(arch: str, size: str) -> tuple[Any, Any]:
    import torch
    import transformers as tf

    big = size == "smolvlm-256m"
    if big and arch != "idefics3":
        raise ValueError(f"size {size!r} is only available for idefics3")
    tok = train_tokenizer(arch)
    config, processor = config_and_processor(tf, tok, arch, big)
    dtype = torch.bfloat16 if big else torch.float32  # the real SmolVLM-256M is bfloat16
    model = tf.AutoModelForImageTextToText.from_config(config, dtype=dtype)
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    silent = [i for i in tok.added_tokens_decoder if i != eos]
    text_config = config.get_text_config()
    silent += range(len(tok), text_config.vocab_size)
    pieces = [tok.decode([i]) for i in range(len(tok))]
    rare = [i for i, s in enumerate(pieces) if "\ufffd" in s or not s.strip("\n").isprintable()]
    _init_weights(model, arch, silent, [*rare, eos])
    chatml = arch not in ("idefics3", "idefics")
    stops = [eos, tok.convert_tokens_to_ids("<|endoftext|>")] if chatml else eos
    model.generation_config = tf.GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=stops,
        pad_token_id=tok.convert_tokens_to_ids(tok.pad_token),
    )
    return model, processor


def build(arch: str, out: str | Path, size: str = "tiny") -> Path:
    """Write a random ``arch`` checkpoint (model + processor) into ``out`` and return it.

    ``size="smolvlm-256m"`` (idefics3 only) gives SmolVLM-256M-Instruct's real dimensions
    (bfloat16, image splitting off), for benchmarks.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = _model_and_processor(arch, size)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    for path in out.iterdir():  # safetensors come out 0600; a shared cache wants 0644
        path.chmod(0o644)
    return out


def _source_hash() -> str:
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256()
    for module in _MODEL_SOURCES:
        h.update(module.read_bytes())
    for name in ["corpus.txt", *sorted(set(TEMPLATES.values()))]:
        h.update(name.encode() + (DATA / name).read_bytes())
    h.update(f"{transformers.__version__} {tokenizers.__version__} {torch.__version__}".encode())
    return h.hexdigest()[:16]


def tiny_model_path(arch: str, size: str = "tiny") -> Path:
    """Build ``arch`` once into ``$VLMQ_TINY_CACHE`` (default ``~/.cache/vlmq/tiny``).

    The directory name holds a hash of the modules that define the models (this one and
    ``worker.tiny_archs``), their data files and the library versions, so edits rebuild.
    Concurrent callers each build into a temp dir; the first rename wins.
    """
    root = Path(os.environ.get("VLMQ_TINY_CACHE") or Path.home() / ".cache" / "vlmq" / "tiny")
    final = root / f"{arch}-{size}-{_source_hash()}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        build(arch, tmp, size)
        tmp.chmod(0o755)
        os.rename(tmp, final)  # atomic; fails if another process got there first
    except OSError:
        if not (final / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m worker.tiny",
        description="Build a deterministic tiny random vision-language model, offline.",
    )
    parser.add_argument("arch", choices=ARCHS, help="architecture to build")
    parser.add_argument("out", type=Path, help="output directory (created if missing)")
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="tiny",
        help="tiny (default), or smolvlm-256m: SmolVLM-256M's real dims, random (idefics3 only)",
    )
    args = parser.parse_args(argv)
    print(build(args.arch, args.out, args.size))


if __name__ == "__main__":
    main()
