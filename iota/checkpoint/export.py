"""Exporting a checkpoint: a transformers LlamaForCausalLM directory, or a copy of the native format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import splintr
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from iota.checkpoint.local import Checkpoint, load_checkpoint
from iota.checkpoint.manifest import MANIFEST_FILE, CheckpointError
from iota.data.tokenizer import BPE_EOS, LLAMA3_BOS, LLAMA3_EOS, BPETokenizer, Llama3Tokenizer, Tokenizer
from iota.model.llama import hf_config_dict, hf_state_dict

HF_WEIGHTS_FILE = "model.safetensors"


def export_hf(checkpoint_dir: Path, out_dir: Path) -> Path:
    """Write `out_dir` for `transformers`: config.json, generation_config.json, model.safetensors (fp32, HF names)
    and the tokenizer, so LlamaForCausalLM and AutoTokenizer load it offline. Refuses a bottleneck model."""
    checkpoint = load_checkpoint(checkpoint_dir)
    if checkpoint.has_bottleneck:
        raise CheckpointError(
            f"{checkpoint_dir} has a bottleneck of width {checkpoint.config.bottleneck} between its stages, which "
            "transformers' LlamaForCausalLM cannot express: export it with `--format native` instead"
        )
    # Before writing anything: a checkpoint without its tokenizer fails early.
    tokenizer = checkpoint.tokenizer()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", hf_config(checkpoint, tokenizer))
    _write_json(out_dir / "generation_config.json", _generation_config(tokenizer))
    weights = {name: t.contiguous() for name, t in hf_state_dict(checkpoint.merged_state()).items()}
    safetensors.torch.save_file(weights, str(out_dir / HF_WEIGHTS_FILE), metadata={"format": "pt"})
    save_hf_tokenizer(tokenizer, out_dir)
    return out_dir


def hf_config(checkpoint: Checkpoint, tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json of the exported model: the LlamaConfig fields, fp32, and the tokenizer's special ids."""
    config = checkpoint.config
    if config.bottleneck is not None:  # one stage: the bottleneck width is recorded but no boundary uses it
        config = type(config).from_dict({**config.to_dict(), "bottleneck": None})
    return {
        **hf_config_dict(config),
        "torch_dtype": "float32",
        "bos_token_id": _bos_id(tokenizer),
        "eos_token_id": tokenizer.eos_id,
        "use_cache": True,
    }


def _generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    return {"bos_token_id": _bos_id(tokenizer), "eos_token_id": tokenizer.eos_id}


def _bos_id(tokenizer: Tokenizer) -> int:
    # A BPE has one special token that doubles as BOS; Llama 3 has its own.
    return tokenizer.bos_id if isinstance(tokenizer, Llama3Tokenizer) else tokenizer.eos_id


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> list[Path]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json, for AutoTokenizer.from_pretrained."""
    out_dir = Path(out_dir)
    if isinstance(tokenizer, BPETokenizer):
        written = tokenizer.save(out_dir)
        bos, eos = BPE_EOS, BPE_EOS
    elif isinstance(tokenizer, Llama3Tokenizer):
        llama3_hf_tokenizer(tokenizer).save(str(out_dir / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": LLAMA3_BOS,
            "eos_token": LLAMA3_EOS,
            "add_bos_token": False,  # iota trains without BOS: documents are separated by EOS
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 131072,
        }
        _write_json(out_dir / "tokenizer_config.json", config)
        written = [out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"]
        bos, eos = LLAMA3_BOS, LLAMA3_EOS
    else:
        raise CheckpointError(f"no transformers form for tokenizer {tokenizer.name!r}")
    _write_json(out_dir / "special_tokens_map.json", {"bos_token": bos, "eos_token": eos})
    return [*written, out_dir / "special_tokens_map.json"]


def llama3_hf_tokenizer(tokenizer: Llama3Tokenizer) -> HFTokenizer:
    """splintr's Llama 3 vocabulary as a `tokenizers` byte-level BPE that encodes text to the same ids.

    Tiktoken-style ranks become BPE merges the way transformers' TikTokenConverter makes them: every split of a
    token into two tokens is a merge, ranked by the merged token's id (with ignore_merges, whole words in the
    vocabulary map straight to their id, as tiktoken does).
    """
    vocabulary = splintr.Tokenizer.from_pretrained("llama3")
    special_ids = set(tokenizer.special_tokens.values())
    ranks: dict[bytes, int] = {}
    for token_id in range(tokenizer.base_vocab_size):
        if token_id in special_ids:
            continue
        try:
            ranks[vocabulary.decode_token_bytes(token_id)] = token_id
        except ValueError:  # ids splintr reserves for special tokens carry no bytes
            continue
    byte_chars = _bytes_to_unicode()

    def as_text(piece: bytes) -> str:
        return "".join(byte_chars[b] for b in piece)

    merges: list[tuple[int, int, int, str, str]] = []
    for piece, rank in ranks.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], as_text(left), as_text(right)))
    merges.sort()
    vocab = {as_text(piece): rank for piece, rank in ranks.items()}
    model = models.BPE(vocab, [(m[3], m[4]) for m in merges], fuse_unk=False, ignore_merges=True)
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(splintr.LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    for content, token_id in specials:
        if token_id < tokenizer.base_vocab_size:  # splintr's extra "agent" tokens are not Llama 3's
            hf.add_special_tokens([AddedToken(content, special=True, normalized=False)])
            if hf.token_to_id(content) != token_id:
                raise CheckpointError(
                    f"special token {content} would get id {hf.token_to_id(content)}, not {token_id}"
                )
    return hf


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def export_native(checkpoint_dir: Path, out_dir: Path) -> Path:
    """Copy the verified checkpoint (manifest, stage files, tokenizer files) to `out_dir`, with a README.md."""
    checkpoint = load_checkpoint(checkpoint_dir)
    source, out_dir = Path(checkpoint_dir), Path(out_dir)
    if source.resolve() == out_dir.resolve():
        raise CheckpointError(f"export_native: {out_dir} is the checkpoint itself")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [entry["file"] for entry in checkpoint.manifest["stages"]]
    files += [
        p.name
        for p in sorted(source.iterdir())
        if p.is_file() and p.name.startswith(("tokenizer", "special"))
    ]
    for name in files:
        shutil.copyfile(source / name, out_dir / name)
    (out_dir / "README.md").write_text(_native_readme(checkpoint), encoding="utf-8")
    shutil.copyfile(source / MANIFEST_FILE, out_dir / MANIFEST_FILE)  # last: its presence means complete
    return out_dir


def _native_readme(checkpoint: Checkpoint) -> str:
    m, config = checkpoint.manifest, checkpoint.config
    stage_lines = "\n".join(
        f"- `{e['file']}`: stage {e['index']}, layers {e['first_layer']}..{e['last_layer'] - 1}, "
        f"{e['n_params']:,} parameters, sha256 `{e['sha256']}`"
        for e in m["stages"]
    )
    return f"""# iota checkpoint: run `{m["run_id"]}`, epoch {m["epoch"]}

Format `{m["format"]}`: the weights every replica started epoch {m["epoch"]} from, after
{m.get("tokens_trained", 0):,} training tokens. A Llama 3 style decoder (hidden {config.hidden},
{config.n_layers} layers, {config.n_heads} heads / {config.n_kv_heads} KV heads, vocabulary {config.vocab_size},
bottleneck {config.bottleneck}) cut into {len(m["stages"])} pipeline stages.

{stage_lines}

Each stage file is safetensors holding that stage's fp32 tensors under their iota names (global layer indices,
e.g. `layers.5.attn.wq.weight`; `bottleneck.up/down/norm` at stage boundaries). `manifest.json` records the model
config, each stage's tensor list and the sha256 of its tensors concatenated in sorted-name order as little-endian
float32, the data plan, learning-rate schedule, data cursor and tokenizer (`{m["tokenizer"]["kind"]}`, digest
`{m["tokenizer"]["digest"]}`); for a BPE run `tokenizer.json` is here.

Load it with `iota.checkpoint.load_checkpoint(dir)` (verifies every tensor) and `compose(checkpoint)` for a module
from token ids to logits; `iota eval`, `iota generate` and `iota export` take this directory.
"""


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
