"""worker.tiny: tiny random VLMs load with the Auto classes and run the image-text-to-text guide."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from worker.tiny import ARCHS, build, main, tiny_model_path  # noqa: E402
from worker.tiny_archs import CHAT_ARCHS  # noqa: E402


def _image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic RGB gradient."""
    image = Image.new("RGB", (width, height))
    image.putdata(
        [
            ((x * 7 * seed + y) % 256, (y * 5 * seed) % 256, (x * y + 40 * seed) % 256)
            for y in range(height)
            for x in range(width)
        ]
    )
    return image


SMALL, LARGE = _image(40, 30, 1), _image(64, 48, 2)


def _user(*images: Image.Image, text: str = "What do we see?") -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image", "image": im} for im in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


FLOWS = {
    "one_image": [_user(SMALL)],
    "two_images": [_user(SMALL, LARGE, text="What differs between the two pictures?")],
    "multi_turn": [
        _user(SMALL),
        {"role": "assistant", "content": [{"type": "text", "text": "A cat and a bee."}]},
        _user(LARGE, text="And in this one?"),
    ],
}


def _generate(processor: Any, model: Any, conversation: Any, **kwargs: Any) -> list[str]:
    """The Transformers image-text-to-text guide, verbatim."""
    inputs = processor.apply_chat_template(
        conversation,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        **kwargs,
    )
    input_len = len(inputs.input_ids[0])
    generated_ids = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    return processor.batch_decode(generated_ids[:, input_len:], skip_special_tokens=True)


@pytest.fixture(scope="module", params=CHAT_ARCHS)
def loaded(request: Any) -> tuple[str, Any, Any]:
    arch = request.param
    path = tiny_model_path(arch)  # built once per machine (test_builds_* check building)
    processor = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.AutoModelForImageTextToText.from_pretrained(path)
    return arch, processor, model


@pytest.mark.parametrize("flow", FLOWS)
def test_guide_flows_give_text(loaded: tuple[str, Any, Any], flow: str) -> None:
    arch, processor, model = loaded
    texts = _generate(processor, model, FLOWS[flow])
    assert len(texts) == 1
    assert isinstance(texts[0], str) and texts[0].strip(), (arch, flow, texts)


def test_processor_setup(loaded: tuple[str, Any, Any]) -> None:
    arch, processor, model = loaded
    tokenizer = processor.tokenizer
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None
    assert processor.chat_template
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    prompt = processor.apply_chat_template(FLOWS["multi_turn"], add_generation_prompt=True)
    marker = "<image>" if arch in ("idefics3", "llava") else "<|image_pad|>"
    assert prompt.count(marker) == 2, prompt
    # Multi-byte characters survive a byte-level round trip.
    text = "Café 🐝 猫"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_batched_generation(loaded: tuple[str, Any, Any]) -> None:
    _, processor, model = loaded
    batch = [FLOWS["one_image"], [_user(LARGE, text="Describe this picture in a few words.")]]
    texts = _generate(processor, model, batch, processor_kwargs={"padding": True})
    assert len(texts) == 2 and all(t.strip() for t in texts), texts


@pytest.mark.parametrize("arch", ["qwen2_vl", "idefics3", "idefics"])
def test_builds_are_byte_identical(arch: str, tmp_path: Path) -> None:
    first, second = build(arch, tmp_path / "a"), build(arch, tmp_path / "b")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def _idefics_caption(processor: Any, model: Any, prompt: list[Any]) -> str:
    """The IDEFICS guide's captioning code (``processor(text=...)`` in transformers 5)."""
    inputs = processor(text=prompt, return_tensors="pt")
    bad_words_ids = processor.tokenizer(["<image>", "<fake_token_around_image>"],
                                        add_special_tokens=False).input_ids
    generated_ids = model.generate(**inputs, max_new_tokens=12, bad_words_ids=bad_words_ids,
                                   do_sample=False)
    return str(processor.batch_decode(generated_ids, skip_special_tokens=True)[0])


def test_idefics_is_image_conditioned(tmp_path: Path) -> None:
    path = build("idefics", tmp_path / "idefics")
    assert "idefics" in ARCHS and "idefics" not in CHAT_ARCHS
    processor = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.AutoModelForImageTextToText.from_pretrained(path)
    assert type(model).__name__ == "IdeficsForVisionText2Text"
    assert type(processor).__name__ == "IdeficsProcessor" and not processor.chat_template
    tokenizer = processor.tokenizer
    for token in ("<image>", "<fake_token_around_image>", "<end_of_utterance>"):
        ids = tokenizer(token, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, token
    gates = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("alpha_")]
    assert gates and all(float(p.detach().abs().min()) > 0 for p in gates)
    # the gates are open: a different picture (or none) changes the greedy caption
    captions = {_idefics_caption(processor, model, [image, "This is an image of "])
                for image in (SMALL, LARGE, Image.new("RGB", (40, 30), "white"))}
    captions.add(_idefics_caption(processor, model, ["This is an image of "]))
    assert len(captions) == 4, captions
    text = "Café 🐝 猫"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_unknown_arch_and_size_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build("gpt2", tmp_path)
    with pytest.raises(ValueError):
        build("llava", tmp_path, size="smolvlm-256m")


def test_tiny_model_path_caches_and_survives_races(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLMQ_TINY_CACHE", str(tmp_path))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(tiny_model_path("llava"))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert (results[0] / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # no temp dirs left
    assert tiny_model_path("llava") == results[0]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["qwen3_vl", str(tmp_path / "out")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert (tmp_path / "out" / "chat_template.jinja").is_file()
