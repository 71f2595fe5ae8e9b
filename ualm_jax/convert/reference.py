"""The authors' UALM checkpoint format (NVIDIA/audio-intelligence, `UALM/`), both ways.

Their `scripts/inference.py` builds `ParallelLLM` from a train.yaml, then loads
`torch.load(path, weights_only=True)["module"]` with `strict=True`. That state dict holds:
  model.embed_tokens.weight, lm_head.weight    [V_joint, d]; row 0 of the input table is zero
                                                (nn.Embedding(padding_idx=0)), looked up unmasked
  model.layers.{i}.*, model.norm.weight        the HF Qwen2 body
  stream_emb.weight [K, d]                     row 0 is never read (stream 0 uses the bare h)
  adaptor.continuous_audio.{weight,bias}       the one linear adapter
  multimodal_io_dict.continuous_audio.model.*  the AF-Whisper encoder (Whisper names)
  multimodal_io_dict.discrete_audio.codec_model.*  transformers' XcodecModel state dict
`ualm export --format ualm-reference` writes OUT/mp_rank_00_model_states.pt with exactly those
names, OUT/text_base/ (the hf-text export and tokenizer: their `model_hf_tag`), OUT/audio_encoder/
(an AFWhisperEncoder folder), OUT/codec/ (a copy of an X-codec run's codec), OUT/train.yaml in
their recipe's format and a model card. `ualm import-reference` reads such a file (or a DeepSpeed
`global_stepN/` folder, or our `--format pytorch` export) back into a params-only checkpoint;
import then export reproduces every tensor bit for bit.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import yaml

from ualm_jax.convert.hf_qwen2 import decoder_from_hf, decoder_to_hf, hf_decoder_names
from ualm_jax.convert.hf_whisper import whisper_encoder_params_from_hf, whisper_encoder_params_to_hf
from ualm_jax.format.vocab import JointVocab

MODEL_FILE = "mp_rank_00_model_states.pt"
ENCODER = "multimodal_io_dict.continuous_audio.model."
CODEC = "multimodal_io_dict.discrete_audio.codec_model."
ADAPTER = "adaptor.continuous_audio."
# Our `--format pytorch` names -> the reference's (the body and tables are named alike).
_PYTORCH_PREFIXES = (("adaptor.audio.", ADAPTER), ("audio_encoder.", ENCODER))


# Our params -> reference tensors ------------------------------------------------------------------
def reference_tensors(params: dict, cfg) -> tuple[dict, list]:
    """(name -> numpy, notes) of everything but the codec. Consumes `params`."""
    m = cfg.model
    if m.num_codebooks < 1:
        raise ValueError("the reference needs a discrete audio IO: model.num_codebooks is 0")
    if m.audio_encoder.enabled and m.adapter != "linear":
        raise ValueError(f"model.adapter={m.adapter!r}: the reference has one linear adapter "
                         "(adaptor.continuous_audio); export --format pytorch instead")
    vocab = JointVocab.from_model_config(m)
    embed = params.pop("embed")
    head = embed if m.tie_embeddings else params.pop("head")
    out = decoder_to_hf(params.pop("decoder"), m)
    table = np.array(embed[:vocab.size])
    notes = []
    if table[0].any():
        table[0] = 0
        notes.append("row 0 (pad) of the input table was not zero (a checkpoint from before pad "
                     "rows were frozen); it is written as zero: our model masks id 0, so the "
                     "numbers are the same")
    out["model.embed_tokens.weight"] = table
    out["lm_head.weight"] = np.ascontiguousarray(head[:vocab.size])
    out["stream_emb.weight"] = np.asarray(params.pop("stream_emb"))  # as stored (row 0 unread)
    if "adaptor" in params:
        layer = params.pop("adaptor")["audio"]
        out[ADAPTER + "weight"] = np.ascontiguousarray(np.asarray(layer["kernel"]).T)
        out[ADAPTER + "bias"] = np.asarray(layer["bias"])
    if "audio_encoder" in params:
        out.update(whisper_encoder_params_to_hf(params.pop("audio_encoder"), m.audio_encoder,
                                                ENCODER))
    return out, notes


def codec_kind(codec_dir: str) -> str:
    """'xcodec', 'spectral', or '' (no codec configured / unknown)."""
    path = Path(codec_dir) / "config.json" if codec_dir else None
    if path is None or not path.is_file():
        return ""
    c = json.loads(path.read_text())
    return "xcodec" if c.get("model_type") == "xcodec" else (
        "spectral" if c.get("codec") == "spectral_rvq" else "")


def codec_state(codec_dir: str) -> dict:
    """The X-codec's state dict under the reference's codec prefix (transformers' names, as the
    reference's `XcodecModel.from_pretrained` holds them)."""
    from transformers import XcodecModel

    model = XcodecModel.from_pretrained(str(codec_dir), local_files_only=True)
    return {CODEC + k: v.detach().clone() for k, v in model.state_dict().items()}


def _to_torch(x: np.ndarray):
    import torch

    x = np.ascontiguousarray(x)
    if x.dtype.name == "bfloat16":  # numpy's bf16 (ml_dtypes) has no torch twin: same bits
        return torch.from_numpy(x.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy() if not x.flags.writeable else x)


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# Side files ---------------------------------------------------------------------------------------
def encoder_config(enc) -> dict:
    """An AFWhisperEncoder (transformers' Qwen2AudioEncoderConfig) config for our encoder."""
    return {"model_type": "qwen2_audio_encoder", "architectures": ["Qwen2AudioEncoder"],
            "num_mel_bins": enc.n_mels, "encoder_layers": enc.n_layers,
            "encoder_attention_heads": enc.n_heads, "encoder_ffn_dim": enc.d_ff,
            "d_model": enc.d_model, "max_source_positions": enc.max_mel_frames // 2,
            "activation_function": "gelu", "scale_embedding": False, "dropout": 0.0,
            "attention_dropout": 0.0, "activation_dropout": 0.0, "encoder_layerdrop": 0.0}


def train_yaml(cfg, final: Path, codec: str, dtype: str) -> dict:
    """The reference recipe's train.yaml (recipes/ualm_all_task/ualm/conf/train.yaml) for this run."""
    m = cfg.model
    io = {"text": {"tokenizer_name": str(final / "text_base")},
          "discrete_audio": {
              "codec_choice": "Xcodec" if codec == "xcodec" else None,
              "codec_hf_model_tag": str(final / "codec") if codec == "xcodec" else None,
              "codec_max_token_per_frame": m.num_codebooks,
              "ssl_choice": None, "ssl_hf_model_tag": None, "delay_interleave": True,
              "stream_weights": m.audio_stream_weights()}}
    if m.audio_encoder.enabled:
        io["continuous_audio"] = {"encoder_choice": "AFWhisper",
                                  "encoder_local_path": str(final / "audio_encoder"), "dtype": dtype}
    return {
        "job_type": "ualm",
        "multimodal_io": io,
        "model": {"model_choice": "parallel", "model_hf_tag": str(final / "text_base"),
                  "model_conf": {"dtype": dtype, "local_files_only": True,
                                 "max_loss_interval": m.max_loss_interval},
                  "activation_checkpointing": m.remat != "none"},
        "preprocessor": {"audio_input": "continuous_audio", "audio_output": "discrete_audio",
                         "loss_region": "assistant", "audio_cfg": cfg.data.cfg_dropout},
        "data_loading": {"batchfy_method": "pack", "batch_size": cfg.train.batch_size * cfg.train.seq_len,
                         "save_loader_state": False, "seed": cfg.seed, "num_workers": 4},
        "trainer": {"deepspeed_config": "conf/deepspeed.json",
                    "freeze_param": ["multimodal_io_dict.discrete_audio",
                                     "multimodal_io_dict.continuous_audio"],
                    "max_step": cfg.train.steps, "save_interval": cfg.train.checkpoint_every,
                    "log_interval": cfg.train.log_every},
    }


def _write_text_base(dest: Path, tensors: dict, cfg, step: int) -> list:
    """OUT/text_base: the hf-text export (from the reference tensors) + tokenizer files."""
    from safetensors.numpy import save_file

    from ualm_jax.convert.export_files import copy_tokenizer, qwen2_config
    from ualm_jax.convert.model_card import model_card

    m = cfg.model
    vocab = JointVocab.from_model_config(m)
    rows = slice(vocab.text_offset, vocab.audio_offset)
    text = {n: tensors[n] for n in hf_decoder_names(m)}
    text["model.embed_tokens.weight"] = np.ascontiguousarray(tensors["model.embed_tokens.weight"][rows])
    head = np.ascontiguousarray(tensors["lm_head.weight"][rows])
    tied = bool(np.array_equal(text["model.embed_tokens.weight"], head))
    if not tied:
        text["lm_head.weight"] = head
    dest.mkdir()
    save_file(text, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(
        qwen2_config(m, m.text_vocab_size, tied, str(head.dtype)), indent=2) + "\n")
    copied = copy_tokenizer(cfg, dest)
    notes = [f"tokenizer files: {', '.join(copied)}" if copied
             else "no tokenizer files: the run had no data.tokenizer (the reference needs one)"]
    (dest / "README.md").write_text(model_card("hf-text", cfg, step, notes))
    return copied


def _write_encoder(dest: Path, tensors: dict, enc) -> None:
    from safetensors.numpy import save_file

    dest.mkdir()
    save_file({k[len(ENCODER):]: v for k, v in tensors.items() if k.startswith(ENCODER)},
              str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(encoder_config(enc), indent=2) + "\n")


def export_reference(params: dict, cfg, step: int, out: Path, dtype: str | None = None) -> Path:
    """`ualm export --format ualm-reference` (see the module docstring). Consumes `params`."""
    import torch

    from ualm_jax.convert.export_files import commit_export
    from ualm_jax.convert.model_card import model_card

    out = Path(out)
    tensors, notes = reference_tensors(params, cfg)
    if dtype:
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    out_dtype = str(next(iter(tensors.values())).dtype)
    kind = codec_kind(cfg.data.codec)
    state = {k: _to_torch(v) for k, v in tensors.items()}
    if kind == "xcodec":
        codec = codec_state(cfg.data.codec)
        if dtype:
            tdt = getattr(torch, dtype)
            codec = {k: v.to(tdt) if v.is_floating_point() else v for k, v in codec.items()}
        state.update(codec)
        notes.append(f"X-codec weights ({len(codec)} tensors) under {CODEC}*, from data.codec; a "
                     "copy of that codec folder is in codec/")
    else:
        what = {"spectral": "the built-in SpectralCodec (the reference has no such codec)",
                "": "no X-codec (data.codec is empty or not a codec folder)"}[kind]
        notes.append(f"NO codec weights: the run's codec is {what}. The reference's strict load "
                     f"wants {CODEC}*: build its DiscreteAudioIO with an X-codec and load with "
                     "strict=False, or add that codec's state dict under the prefix")
    final = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        torch.save({"module": state}, tmp / MODEL_FILE)
        del state
        _write_text_base(tmp / "text_base", tensors, cfg, step)
        if cfg.model.audio_encoder.enabled:
            _write_encoder(tmp / "audio_encoder", tensors, cfg.model.audio_encoder)
        if kind == "xcodec":
            shutil.copytree(cfg.data.codec, tmp / "codec")
        body = yaml.safe_dump(train_yaml(cfg, final, kind, out_dtype), sort_keys=False)
        (tmp / "train.yaml").write_text(
            "# The authors' UALM recipe format (scripts/train.py / scripts/inference.py "
            "--train-config).\n# Paths are where `ualm export` wrote this folder: edit them if "
            "you move it.\n" + body)
        (tmp / "README.md").write_text(model_card("ualm-reference", cfg, step, notes))
        commit_export(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# Reference tensors -> our params ------------------------------------------------------------------
def find_model_file(source: str | Path) -> Path:
    """A model-states .pt; a folder holding one (a DeepSpeed `global_stepN/` or our export); or a
    DeepSpeed save folder whose `latest` file names the tag."""
    p = Path(source)
    if p.is_file():
        return p
    if (p / MODEL_FILE).is_file():
        return p / MODEL_FILE
    if (p / "latest").is_file():
        tagged = p / (p / "latest").read_text().strip() / MODEL_FILE
        if tagged.is_file():
            return tagged
    raise FileNotFoundError(f"{source}: expected a {MODEL_FILE} file, a folder holding one "
                            f"(e.g. DeepSpeed's global_stepN/), or a DeepSpeed folder with 'latest'")


def read_state(source: str | Path) -> tuple[dict, Path]:
    """(reference-named torch state dict, file read). Our `--format pytorch` export (model.safetensors
    + ualm_config.json) is renamed on the fly."""
    p = Path(source)
    if p.is_dir() and (p / "ualm_config.json").is_file() and (p / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = {}
        for k, v in load_file(str(p / "model.safetensors")).items():
            for ours, theirs in _PYTORCH_PREFIXES:
                if k.startswith(ours):
                    k = theirs + k[len(ours):]
            state[k] = v
        return state, p / "model.safetensors"
    import torch

    path = find_model_file(p)
    ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ck, Mapping) or "module" not in ck:
        keys = list(ck)[:6] if isinstance(ck, Mapping) else type(ck).__name__
        raise ValueError(f"{path} has no 'module' entry ({keys}): not a reference/DeepSpeed "
                         "model-states file")
    return dict(ck["module"]), path


class _NumpyView(Mapping):
    """name -> numpy over a torch state dict, converting on access (one tensor at a time)."""

    def __init__(self, state: Mapping):
        self.state = state

    def __getitem__(self, name):
        if name not in self.state:
            raise KeyError(f"missing tensor {name}")
        return _to_numpy(self.state[name])

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)


def params_from_reference(state: Mapping, cfg) -> tuple[dict, dict]:
    """(our params as numpy in model.param_dtype, report). Every tensor is checked against the
    config's shapes; tensors left over (but the codec's) are an error."""
    m = cfg.model
    vocab = JointVocab.from_model_config(m)
    dt = np.dtype(m.param_dtype) if m.param_dtype != "bfloat16" else None
    view = _NumpyView(state)
    used: set = set()

    def get(name: str, shape: tuple | None = None) -> np.ndarray:
        x = view[name]
        if shape is not None and tuple(x.shape) != tuple(shape):
            raise ValueError(f"tensor {name} has shape {tuple(x.shape)}, expected {tuple(shape)} "
                             f"from the config (d_model={m.d_model}, joint vocab {vocab.size} = "
                             f"{m.num_special} + text_vocab_size {m.text_vocab_size} + "
                             f"{m.num_codebooks} x (codebook_size {m.codebook_size} + 1))")
        used.add(name)
        return x

    def cast(x):
        if dt is not None:
            return x.astype(dt)
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16)

    params: dict = {}
    for name, key in (("model.embed_tokens.weight", "embed"), ("lm_head.weight", "head")):
        x = get(name, (vocab.size, m.d_model))
        if key == "embed" and x[0].any():
            raise ValueError(f"{name}: row 0 (pad) is not zero. The reference keeps it zero "
                             "(padding_idx=0) and our model masks id 0, so the imported model "
                             "would compute other numbers than the source")
        table = np.zeros((vocab.padded_size, m.d_model), cast(x[:0]).dtype)
        table[:vocab.size] = x  # cast in place: no second table
        params[key] = table
    params["decoder"] = decoder_from_hf(lambda n: get(n), m, cast(x[:0]).dtype)
    params["stream_emb"] = cast(get("stream_emb.weight", (max(m.num_codebooks, 1), m.d_model)))
    enc = m.audio_encoder
    if enc.enabled:
        w = get(ADAPTER + "weight", (m.d_model, enc.d_model))
        params["adaptor"] = {"audio": {"kernel": cast(np.ascontiguousarray(w.T)),
                                       "bias": cast(get(ADAPTER + "bias", (m.d_model,)))}}
        sub = {k: state[k] for k in state if k.startswith(ENCODER)}
        params["audio_encoder"] = _tree_cast(
            whisper_encoder_params_from_hf(_NumpyView(sub), enc, ENCODER), cast)
        used.update(sub)
    codec = sorted(k for k in state if k.startswith(CODEC))
    left = sorted(set(state) - used - set(codec))
    if left:
        raise ValueError(f"{len(left)} tensor(s) this config has no place for: {left[:8]}"
                         f"{' ...' if len(left) > 8 else ''} (is the config right: n_layers, "
                         "audio_encoder.enabled, num_codebooks?)")
    report = {"tensors": len(state), "imported": len(used), "codec_tensors": len(codec),
              "source_dtypes": sorted({str(state[k].dtype) for k in used}),
              "vocab": vocab.describe()}
    return params, report


def _tree_cast(tree, fn):
    if isinstance(tree, dict):
        return {k: _tree_cast(v, fn) for k, v in tree.items()}
    return fn(np.asarray(tree))


def _check_codec(state: Mapping, codec_dir: str) -> str:
    """How the file's codec tensors relate to data.codec (they are not imported: the codec is
    frozen and lives in its own folder)."""
    names = [k for k in state if k.startswith(CODEC)]
    if not names:
        return "the file has no codec tensors"
    if codec_kind(codec_dir) != "xcodec":
        return (f"{len(names)} codec tensors not imported; set data.codec to that X-codec's "
                "folder to decode audio (and to export them again)")
    import torch

    ours = codec_state(codec_dir)
    same = set(ours) == set(names) and all(torch.equal(ours[k], state[k].to(ours[k].dtype))
                                           for k in names)
    return (f"{len(names)} codec tensors equal data.codec's" if same else
            f"{len(names)} codec tensors DIFFER from data.codec ({codec_dir}): exporting again "
            "writes data.codec's")


def import_reference(source: str | Path, out_dir: str | Path, cfg) -> dict:
    """`ualm import-reference`: a reference checkpoint -> OUT/config.yaml + OUT/checkpoints/0
    (params only, usable as train.init_from), as `ualm import-hf` lays it out."""
    from ualm_jax.checkpoint import save_params
    from ualm_jax.model.params import abstract_params, build_model
    from ualm_jax.model.paths import named_leaves

    out_dir = Path(out_dir)
    if (out_dir / "checkpoints").exists():
        raise FileExistsError(f"{out_dir} already holds checkpoints; choose a new --out")
    cfg.model.tie_embeddings = False  # the reference's tables are separate
    cfg.validate()
    state, path = read_state(source)
    params, report = params_from_reference(state, cfg)
    shapes, _ = abstract_params(build_model(cfg.model))

    want = {k: (tuple(v.shape), str(v.dtype)) for k, v in named_leaves(shapes)}
    got = {k: (tuple(v.shape), str(v.dtype)) for k, v in named_leaves(params)}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:6]
        raise ValueError(f"imported tree does not match the model's parameters: {diff}")
    report.update(source=str(path), codec=_check_codec(state, cfg.data.codec))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(cfg.to_yaml())
    save_params(out_dir / "checkpoints", params)
    (out_dir / "import_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
