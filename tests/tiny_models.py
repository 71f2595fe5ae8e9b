"""Tiny random transformers models shared by unit and integration tests (built into temp dirs)."""
import importlib.util

import pytest

needs_torch = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("torch", "transformers")),
                                 reason="needs torch and transformers")
CAPTIONS = ["a low hum", "a beep", "a high whistle rings"]


def _tiny_tokenizer():
    """A byte-level BPE with RoBERTa specials, trained on a few words (CLAP's text tower is RoBERTa)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CAPTIONS * 4, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return transformers.RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                             sep_token="</s>", cls_token="<s>", pad_token="<pad>",
                                             unk_token="<unk>", mask_token="<mask>")


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    import torch
    from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, ClapTextConfig

    path = tmp_path_factory.mktemp("tiny_clap")
    tokenizer = _tiny_tokenizer()
    # 48 kHz like LAION-CLAP, but 1 s windows and 16 mel bands; spec_size 64 = 4 x 16 bands.
    fe = ClapFeatureExtractor(feature_size=16, sampling_rate=48000, hop_length=480, max_length_s=1,
                              fft_window_size=1024, truncation="rand_trunc", padding="repeatpad")
    text = ClapTextConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=40, projection_dim=8)
    audio = ClapAudioConfig(num_mel_bins=16, spec_size=64, window_size=8, patch_size=4, patch_stride=(4, 4),
                            depths=(1, 1), num_attention_heads=(2, 2), patch_embeds_hidden_size=16,
                            hidden_size=32, projection_dim=8, enable_fusion=False)
    torch.manual_seed(0)
    model = ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=8))
    model.save_pretrained(path)
    ClapProcessor(feature_extractor=fe, tokenizer=tokenizer).save_pretrained(path)
    return path
