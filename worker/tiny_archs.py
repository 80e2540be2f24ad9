"""The per-architecture parts of ``worker.tiny``'s models: tokenizers, configs, processors.

For each architecture: the tokenizer class and special tokens of the real checkpoint (a
byte-level BPE trained on ``worker/data/corpus.txt``), the real chat template from
``worker/data``, and a model config and processor of the real classes with tiny dimensions
(or, for idefics3, SmolVLM-256M's). ``worker.tiny`` builds, seeds and caches the models; its
cache key hashes this module too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHAT_ARCHS = ("idefics3", "llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # with a chat template
ARCHS = (*CHAT_ARCHS, "idefics")  # idefics: IDEFICS (v1), interleaved prompts, no chat template
DATA = Path(__file__).with_name("data")
TEMPLATES = {  # real chat templates: SmolVLM, llava-interleave-qwen, Qwen2/2.5-VL, Qwen3-VL
    "idefics3": "smolvlm.jinja",
    "llava": "llava_interleave.jinja",
    "qwen2_vl": "qwen2_vl.jinja",
    "qwen2_5_vl": "qwen2_vl.jinja",
    "qwen3_vl": "qwen3_vl.jinja",
}
VOCAB = 1024  # trained byte-level BPE: 256 byte symbols + merges, before special tokens
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_VL = [
    *("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"),
    *("<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>"),
    *("<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"),
]
SMOLVLM = [
    *("<fake_token_around_image>", "<image>", "<global-img>"),
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
    "<end_of_utterance>",
]
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
SMOLVLM_VIT = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
)
IDEFICS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]  # idefics-9b(-instruct)
LLAMA_BYTES = [f"<0x{b:02X}>" for b in range(256)]  # SentencePiece byte fallback pieces
PLAIN = {  # added, non-special tokens
    "qwen2_5_vl": ["<tool_call>", "</tool_call>"],
    "qwen3_vl": ["<tool_call>", "</tool_call>", "<think>", "</think>"],
}


def train_tokenizer(arch: str) -> Any:
    """Train a byte-level BPE on the corpus and wrap it in the architecture's tokenizer class."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer, LlamaTokenizer, Qwen2Tokenizer

    if arch == "idefics":
        return _llama_tokenizer(LlamaTokenizer, Tokenizer, models, pre_tokenizers, trainers)
    cls: Any
    if arch == "idefics3":  # SmolVLM (SmolLM2): ChatML tokens first, image tokens last
        cls, first, special = GPT2Tokenizer, CHATML, SMOLVLM
        named = {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>"}
        named |= {"pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"}
    else:  # Qwen BPE; llava-interleave-qwen is Qwen1.5 plus "<image>"
        cls, first = Qwen2Tokenizer, []
        special = [*CHATML, "<image>"] if arch == "llava" else [*CHATML, *QWEN_VL]
        named = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    plain = PLAIN.get(arch, [])
    proto = cls().backend_tokenizer  # the class's own normalizer and pre-tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer, bpe.pre_tokenizer = proto.normalizer, proto.pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB + len(first),
        special_tokens=first,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    corpus = (DATA / "corpus.txt").read_text(encoding="utf-8")
    bpe.train_from_iterator(corpus.splitlines(keepends=True), trainer)
    trained = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(trained["vocab"])
    for token in special + plain:  # fixed ids right after the trained vocabulary
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = cls(
        vocab=vocab,
        merges=merges,
        extra_special_tokens=first + special,
        padding_side="left",
        model_max_length=8192,
        **named,
    )
    tok.add_tokens(plain)
    return tok


def _llama_tokenizer(cls: Any, tokenizer: Any, models: Any, pre_tokenizers: Any,
                     trainers: Any) -> Any:
    """IDEFICS (v1): a LLaMA tokenizer (Metaspace BPE with byte fallback), ``<s>``/``</s>``/
    ``<unk>`` first, then the 256 byte pieces, the trained merges and IDEFICS' image tokens."""
    first = ["<unk>", "<s>", "</s>"]
    bpe = tokenizer(models.BPE(byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB + len(first) + len(LLAMA_BYTES),
                                  special_tokens=first + LLAMA_BYTES, show_progress=False)
    corpus = (DATA / "corpus.txt").read_text(encoding="utf-8")
    bpe.train_from_iterator(corpus.splitlines(keepends=True), trainer)
    trained = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(trained["vocab"])
    for token in IDEFICS:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    return cls(vocab=vocab, merges=merges, extra_special_tokens=IDEFICS, padding_side="left",
               model_max_length=2048, pad_token="<unk>")


def _text(tok: Any, big: bool, **extra: Any) -> dict[str, Any]:
    """Text-model kwargs: tiny dims, or SmolVLM-256M's SmolLM2-135M-like Llama."""
    n_layers, hidden, inter, heads, kv = (30, 576, 1536, 9, 3) if big else (2, 64, 128, 4, 2)
    bos = tok.convert_tokens_to_ids(tok.bos_token) if tok.bos_token else None
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": 49280 if big else len(tok),
        "max_position_embeddings": 8192,
        "bos_token_id": bos,
        "eos_token_id": tok.convert_tokens_to_ids(tok.eos_token),
        "pad_token_id": tok.convert_tokens_to_ids(tok.pad_token),
        "tie_word_embeddings": False,  # tied random embeddings make greedy repeat its input
        **extra,
    }


def _idefics3(tf: Any, tok: Any, template: str, big: bool) -> tuple[Any, Any]:
    # SmolVLM layout without image splitting: every image becomes one square tile.
    edge, patch, scale = (512, 16, 4) if big else (64, 8, 2)
    dims = SMOLVLM_VIT if big else TINY_VIT
    vision = tf.Idefics3VisionConfig(**dims, image_size=edge, patch_size=patch)
    rope = {"rope_type": "default", "rope_theta": 100000.0}
    text = tf.LlamaConfig(**_text(tok, big, rms_norm_eps=1e-5, rope_parameters=rope))
    image_token_id = tok.convert_tokens_to_ids("<image>")
    config = tf.Idefics3Config(
        text_config=text, vision_config=vision, scale_factor=scale, image_token_id=image_token_id
    )
    images = tf.Idefics3ImageProcessor(
        size={"longest_edge": edge}, max_image_size={"longest_edge": edge}, do_image_splitting=False
    )
    seq_len = (edge // patch) ** 2 // scale**2  # LM tokens per image
    return config, tf.Idefics3Processor(images, tok, image_seq_len=seq_len, chat_template=template)


def _llava(tf: Any, tok: Any, template: str) -> tuple[Any, Any]:
    # llava-interleave-qwen: SigLIP tower (no head), Qwen2 LM, every patch kept ("full").
    vision = tf.SiglipVisionConfig(**TINY_VIT, image_size=32, patch_size=8, vision_use_head=False)
    config = tf.LlavaConfig(
        vision_config=vision,
        text_config=tf.Qwen2Config(**_text(tok, False)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    images = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
    processor = tf.LlavaProcessor(
        images,
        tok,
        patch_size=8,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=template,
    )
    return config, processor


def _qwen(tf: Any, tok: Any, template: str, arch: str) -> tuple[Any, Any]:
    v3 = arch == "qwen3_vl"
    name = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL"}[arch]
    patch = 16 if v3 else 14
    factor = 2 * patch  # spatial merge 2x2: one LM token per 2x2 patches
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 5e6 if v3 else 1e6}
    rope["mrope_section"] = [4, 2, 2] if v3 else [2, 3, 3]  # sums to head_dim / 2 = 8
    if v3:
        rope["mrope_interleaved"] = True
    text = _text(tok, False, rope_parameters=rope) | ({"head_dim": 16} if v3 else {})
    vision: dict[str, Any] = {"depth": 2, "num_heads": 2, "patch_size": patch}
    vision |= {"spatial_merge_size": 2, "temporal_patch_size": 2}
    if arch == "qwen2_vl":
        vision |= {"embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2}
    else:
        vision |= {"hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64}
        if v3:
            vision |= {"num_position_embeddings": 64, "deepstack_visual_indexes": [1]}
        else:
            vision |= {"window_size": 4 * factor, "fullatt_block_indexes": [1]}
    tid = tok.convert_tokens_to_ids
    config = getattr(tf, f"{name}Config")(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
    )
    # 4 to 9 LM tokens per image: resized to between 2x2 and 3x3 merged patches.
    pixels: dict[str, Any] = {"patch_size": patch}
    pixels |= {"min_pixels": (2 * factor) ** 2, "max_pixels": (3 * factor) ** 2}
    if v3:
        pixels |= {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    video = tf.Qwen3VLVideoProcessor if v3 else tf.Qwen2VLVideoProcessor
    processor = getattr(tf, f"{name}Processor")(
        image_processor=tf.Qwen2VLImageProcessor(**pixels),
        tokenizer=tok,
        video_processor=video(**pixels),
        chat_template=template,
    )
    return config, processor


def _idefics(tf: Any, tok: Any) -> tuple[Any, Any]:
    # IDEFICS (v1), idefics-9b's layout: CLIP-like tower, perceiver resampler, a LLaMA with a
    # gated cross-attention block before every decoder layer. The gates start open ("ones"):
    # with the checkpoint default ("zeros") the text would never see the images.
    vision = tf.IdeficsVisionConfig(embed_dim=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=32, patch_size=8)
    perceiver = tf.IdeficsPerceiverConfig(use_resampler=True, resampler_n_latents=4,
                                          resampler_depth=1, resampler_n_heads=2,
                                          resampler_head_dim=16)
    text = _text(tok, False)
    config = tf.IdeficsConfig(
        **{k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "vocab_size", "bos_token_id",
                                "eos_token_id", "pad_token_id", "tie_word_embeddings")},
        max_position_embeddings=2048, alpha_initializer="ones", alpha_type="float",
        cross_layer_interval=1, use_resampler=True, vision_config=vision.to_dict(),
        perceiver_config=perceiver.to_dict())
    images = tf.IdeficsImageProcessor(image_size=32)
    return config, tf.IdeficsProcessor(images, tok, image_size=32)


def config_and_processor(tf: Any, tok: Any, arch: str, big: bool) -> tuple[Any, Any]:
    """``arch``'s model config and processor (``tf`` is the transformers module), with the
    architecture's real chat template (none for idefics, like the real checkpoints);
    ``big``: SmolVLM-256M's dimensions (idefics3 only)."""
    if arch == "idefics":
        return _idefics(tf, tok)
    template = (DATA / TEMPLATES[arch]).read_text(encoding="utf-8").rstrip("\n")
    if arch == "idefics3":
        return _idefics3(tf, tok, template, big)
    if arch == "llava":
        return _llava(tf, tok, template)
    return _qwen(tf, tok, template, arch)
