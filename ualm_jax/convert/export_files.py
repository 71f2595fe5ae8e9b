"""What every export writes besides its tensors, shared by the formats (export.py, reference.py):
the HF Qwen2 config, the run's tokenizer files, ordinary permissions, the checksum manifest, and
one meaning for "the disk is full" whatever the writer."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import ualm_jax.storage as storage

# What a HF tokenizer folder may hold; copied into an hf-text export.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")
MANIFEST = "MANIFEST.sha256"  # written last: an export is complete when it exists
# How writers report a full disk when they do not raise OSError(ENOSPC): safetensors and
# tensorstore put the OS error in their message; torch.save's zip writer only notices that fewer
# bytes landed than it wrote ("unexpected pos ...").
NO_SPACE_MARKS = ("No space left on device", "os error 28", "os_error_code='28'", "unexpected pos",
                  "file write failed")


def is_disk_full(e: BaseException) -> bool:
    """True when `e` (or an exception it was raised from) says the disk is full."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if any(mark in str(e) for mark in NO_SPACE_MARKS):
            return True
        e = e.__cause__ or e.__context__
    return False


def raise_if_disk_full(e: BaseException, path) -> None:
    """Re-raises a full-disk failure of any writer as OSError(ENOSPC) naming `path`."""
    if is_disk_full(e) and not (isinstance(e, OSError) and e.filename == str(path)):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e


def qwen2_config(cfg, vocab_size: int, tied: bool, dtype: str) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": 32768,
        "hidden_act": "silu", "tie_word_embeddings": tied, "torch_dtype": dtype,
        "use_sliding_window": False, "attention_dropout": 0.0, "bos_token_id": None,
        "eos_token_id": None,
    }


def copy_tokenizer(cfg, dest: Path) -> list[str]:
    """The run's tokenizer files (data.tokenizer: a tokenizer.json or a folder) into `dest`, so
    `AutoTokenizer.from_pretrained(dest)` gives the real tokenizer. -> names copied ([] if none)."""
    if not cfg.data.tokenizer:
        return []
    src = Path(cfg.data.tokenizer)
    folder, main = (src, src / "tokenizer.json") if src.is_dir() else (src.parent, src)
    if not main.is_file():
        raise FileNotFoundError(f"data.tokenizer={cfg.data.tokenizer} has no tokenizer.json")
    shutil.copyfile(main, dest / "tokenizer.json")
    copied = ["tokenizer.json"]
    if src.is_dir() or src.name == "tokenizer.json":  # its siblings belong to the same tokenizer
        for name in TOKENIZER_FILES[1:]:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, dest / name)
                copied.append(name)
    if "tokenizer_config.json" not in copied:  # a bare tokenizer.json: say how to load it
        (dest / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False},
            indent=2) + "\n")
        copied.append("tokenizer_config.json")
    return copied


def make_readable(root: Path) -> None:
    """Files 0644, folders 0755: an export is for other users too (mkdtemp makes it 0700)."""
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)


def write_manifest(tmp: Path) -> None:
    """MANIFEST.sha256 over every file below `tmp` (sub-folders included), written last."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    (tmp / MANIFEST).write_text("".join(f"{storage.sha256(p)}  {p.relative_to(tmp).as_posix()}\n"
                                        for p in files))


def commit_export(tmp: Path, out: Path) -> None:
    """A finished export folder into place: manifest last, ordinary permissions, then one rename
    over any previous export, so a reader never sees a half-written one."""
    write_manifest(tmp)
    make_readable(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
