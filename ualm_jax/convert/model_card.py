"""The short README.md every export carries: what the folder is, its vocabulary, how to load it."""
from __future__ import annotations

from ualm_jax.format.vocab import JointVocab

_LOAD = {
    "pytorch": (
        "```python\n"
        "from safetensors.torch import load_file\n"
        "state = load_file('model.safetensors')  # names: see ualm_config.json\n"
        "```\n"
        "Stream k's logits are `(h + stream_emb.weight[k]) @ lm_head.weight.T` with "
        "`stream_emb.weight[0]` = 0; the input embedding is the sum of the K streams' rows of "
        "`model.embed_tokens.weight` (row 0, pad, is zero)."),
    "hf-text": (
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained('.')\n"
        "tok = AutoTokenizer.from_pretrained('.')  # when the run had a tokenizer\n"
        "```\n"
        "Only the text part of the UALM: token ids are the text tokenizer's own (unshifted)."),
    "ualm-reference": (
        "For the authors' code (NVIDIA/audio-intelligence, `UALM/`):\n"
        "```bash\n"
        "python scripts/inference.py --train-config train.yaml \\\n"
        "    --model-checkpoint mp_rank_00_model_states.pt --inference-config YOUR_INFERENCE.yaml ...\n"
        "```\n"
        "`train.yaml` points at `text_base/` (body config and tokenizer), `audio_encoder/` and "
        "`codec/` with absolute paths of this folder: edit them if you move it. Back into JAX: "
        "`ualm import-reference . --config RUN_CONFIG.yaml --out CKPT`."),
}


def vocab_lines(vocab: JointVocab) -> str:
    d = vocab.describe()
    rows = [f"- special tokens: ids [{d['special'][0]}, {d['special'][1]}) (pad 0, bos 1, eos 2, "
            f"eot 3, system 4, user 5, assistant 6, text 7, audio 8, speech 9)",
            f"- text: ids [{d['text'][0]}, {d['text'][1]}) = tokenizer id + {vocab.text_offset}"]
    for k, (lo, hi) in enumerate(d["codebooks"]):
        rows.append(f"- codebook {k}: ids [{lo}, {hi}) (its pad id {lo} first, then codes 0..)")
    rows.append(f"- total {d['size']} ids")
    return "\n".join(rows)


def model_card(fmt: str, cfg, step: int, notes: list[str] = ()) -> str:
    """cfg: the run's Config; notes: format-specific facts (e.g. what was left out)."""
    m = cfg.model
    vocab = JointVocab.from_model_config(m)
    what = {"pytorch": "the whole UALM (Qwen2 body, joint-vocabulary tables, stream embeddings, "
                       "adapter, audio encoder) in safetensors with HF Qwen2 names",
            "hf-text": "a plain Qwen2ForCausalLM of the text part of a UALM (text rows of the "
                       "input table and of the head)",
            "ualm-reference": "a UALM checkpoint in the authors' own format: "
                              "`mp_rank_00_model_states.pt` = `{'module': ParallelLLM state_dict}`"}[fmt]
    enc = m.audio_encoder
    lines = [f"# UALM export ({fmt})", "", f"This folder holds {what}, written by `ualm export "
             f"--format {fmt}` from training step {step}.", "",
             "## Model", "",
             f"- body: Qwen2, {m.n_layers} layers, d={m.d_model}, {m.n_heads} query / "
             f"{m.n_kv_heads} KV heads (head dim {m.head_dim}), FFN {m.d_ff}",
             f"- audio streams K={m.num_codebooks}, codebook size C={m.codebook_size}",
             ("- audio encoder: Whisper-style, " f"{enc.n_layers} layers, d={enc.d_model}, "
              f"{enc.n_mels} mels, pool {enc.pool}; adapter: {m.adapter}") if enc.enabled
             else "- no audio encoder", ""]
    if fmt != "hf-text":
        lines += ["## Vocabulary (one id space)", "", vocab_lines(vocab), ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Loading", "", _LOAD[fmt], ""]
    return "\n".join(lines)
