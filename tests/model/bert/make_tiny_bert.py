#!/usr/bin/python3
"""Writes tiny random BERT-family checkpoints plus reference outputs for bert_model_test.

    /usr/bin/python3 tests/model/bert/make_tiny_bert.py OUTDIR

Needs only Debian's python3-torch (transformers is not available): the reference forward below is a plain-torch
transcription of Hugging Face's BertModel / RobertaModel / ElectraModel (modeling_bert.py etc.), written
independently of the C++ code, computed in float64. It deliberately uses HF's own position-id rules (BERT:
arange(T); RoBERTa: cumsum over non-pad ids + padding_idx), so the C++ mask-derived positions are checked against
them on real tokens.

Each OUTDIR/<name>/ gets config.json, model.safetensors (written by hand: u64 LE header length + JSON + raw bytes),
vocab.txt, maybe tokenizer_config.json / modules.json / 1_Pooling/config.json, and
  reference.safetensors  for each case i: case<i>.input_ids [B,T] I64, case<i>.attention_mask [B,T] I64 (0/1),
                         case<i>.hidden [B,T,H] F32 (padding positions: zeros, not to be compared),
                         case<i>.pooled [B,D] F32
  reference.json         {"num_cases": N, "sentences": [{"text": ..., "ids": [...]}], "pooling": "...",
                          "hidden_size": H, "max_sequence_length": M}
The sentences are case<N>.. in reference.safetensors (one row each, no padding).
"""
import json
import math
import os
import struct
import sys

import torch

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sat", "on", "mat", "hello",
         "world", "!", ",", ".", "un", "##aff", "##able", "is", "was", "big", "small", "red", "blue", "house",
         "tree", "run", "##s", "##ing", "and"]

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.int32: "I32"}


def write_safetensors(path, tensors):
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        data = t.numpy().tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTS = {"gelu": gelu_erf, "gelu_new": gelu_tanh, "relu": torch.relu}


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def linear(x, w, b):
    return x @ w.t() + b


def reference_forward(cfg, W, ids, mask, pooling):
    """HF-style forward in float64. W: un-prefixed names -> float64 tensors. ids/mask [B,T] int64."""
    B, T = ids.shape
    H = cfg["hidden_size"]
    NH = cfg["num_attention_heads"]
    DH = H // NH
    eps = cfg["layer_norm_eps"]
    if cfg["model_type"] in ("roberta", "xlm-roberta", "camembert"):
        pad = cfg["pad_token_id"]
        # HF create_position_ids_from_input_ids (the padding positions hold the pad id).
        m = ids.ne(pad).long()
        positions = torch.cumsum(m, dim=1) * m + pad
    else:
        positions = torch.arange(T).unsqueeze(0).expand(B, T)
    x = W["embeddings.word_embeddings.weight"][ids]
    x = x + W["embeddings.token_type_embeddings.weight"][torch.zeros_like(ids)]
    x = x + W["embeddings.position_embeddings.weight"][positions]
    x = layer_norm(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"], eps)
    if "embeddings_project.weight" in W:
        x = linear(x, W["embeddings_project.weight"], W["embeddings_project.bias"])
    ext = (1.0 - mask.to(torch.float64))[:, None, None, :] * torch.finfo(torch.float64).min
    act = ACTS[cfg["hidden_act"]]
    for n in range(cfg["num_hidden_layers"]):
        p = "encoder.layer.%d." % n

        def heads(t):
            return t.view(B, T, NH, DH).permute(0, 2, 1, 3)

        q = heads(linear(x, W[p + "attention.self.query.weight"], W[p + "attention.self.query.bias"]))
        k = heads(linear(x, W[p + "attention.self.key.weight"], W[p + "attention.self.key.bias"]))
        v = heads(linear(x, W[p + "attention.self.value.weight"], W[p + "attention.self.value.bias"]))
        scores = q @ k.transpose(-1, -2) / math.sqrt(DH) + ext
        probs = torch.softmax(scores, dim=-1)
        ctx = (probs @ v).permute(0, 2, 1, 3).reshape(B, T, H)
        a = linear(ctx, W[p + "attention.output.dense.weight"], W[p + "attention.output.dense.bias"])
        x = layer_norm(a + x, W[p + "attention.output.LayerNorm.weight"], W[p + "attention.output.LayerNorm.bias"],
                       eps)
        h = act(linear(x, W[p + "intermediate.dense.weight"], W[p + "intermediate.dense.bias"]))
        o = linear(h, W[p + "output.dense.weight"], W[p + "output.dense.bias"])
        x = layer_norm(o + x, W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"], eps)
    mf = mask.to(torch.float64).unsqueeze(-1)
    if pooling["mode"] == "cls":
        pooled = x[:, 0]
    else:  # mean (sentence-transformers)
        pooled = (x * mf).sum(1) / mf.sum(1).clamp(min=1e-9)
    if pooling["normalize"]:
        pooled = pooled / pooled.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return x * mf, pooled


def random_weights(cfg, gen):
    H = cfg["hidden_size"]
    E = cfg.get("embedding_size", H)
    I = cfg["intermediate_size"]

    def randn(*shape, std):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    W = {
        "embeddings.word_embeddings.weight": randn(cfg["vocab_size"], E, std=0.5),
        "embeddings.position_embeddings.weight": randn(cfg["max_position_embeddings"], E, std=0.5),
        "embeddings.token_type_embeddings.weight": randn(cfg["type_vocab_size"], E, std=0.5),
        "embeddings.LayerNorm.weight": 1.0 + randn(E, std=0.1),
        "embeddings.LayerNorm.bias": randn(E, std=0.1),
    }
    if E != H:
        W["embeddings_project.weight"] = randn(H, E, std=1.0 / math.sqrt(E))
        W["embeddings_project.bias"] = randn(H, std=0.1)
    for n in range(cfg["num_hidden_layers"]):
        p = "encoder.layer.%d." % n
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            W[p + name + ".weight"] = randn(H, H, std=1.5 / math.sqrt(H))
            W[p + name + ".bias"] = randn(H, std=0.1)
        W[p + "intermediate.dense.weight"] = randn(I, H, std=1.0 / math.sqrt(H))
        W[p + "intermediate.dense.bias"] = randn(I, std=0.1)
        W[p + "output.dense.weight"] = randn(H, I, std=1.0 / math.sqrt(I))
        W[p + "output.dense.bias"] = randn(H, std=0.1)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            W[p + name + ".weight"] = 1.0 + randn(H, std=0.1)
            W[p + name + ".bias"] = randn(H, std=0.1)
    return W


def make_model(out, name, cfg, vocab, pooling, prefix="", store_dtype=torch.float32, extra=None, gamma_beta=False,
               files=None, seed=0):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    W = random_weights(cfg, gen)
    # Round to the stored precision so the reference uses exactly the weights the C++ side reads.
    W = {k: v.to(store_dtype).to(torch.float64) for k, v in W.items()}
    stored = {}
    for k, v in W.items():
        key = prefix + k
        if gamma_beta and ".LayerNorm." in key:
            key = key.replace(".LayerNorm.weight", ".LayerNorm.gamma").replace(".LayerNorm.bias", ".LayerNorm.beta")
        stored[key] = v.to(store_dtype)
    for k, v in (extra or {}).items():
        stored[k] = v
    write_safetensors(os.path.join(d, "model.safetensors"), stored)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(d, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    for rel, content in (files or {}).items():
        path = os.path.join(d, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(content, f, indent=2)

    pad_id = cfg["pad_token_id"]
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    max_len = cfg["max_position_embeddings"] - (pad_id + 1 if cfg["model_type"] == "roberta" else 0)
    rows = [
        [cls_id, 5, 7, 9, 10, 5, 11, 16, sep_id],
        [cls_id, 12, 13, 14, sep_id],
        [cls_id, 17, 18, 19, sep_id],
        [cls_id, sep_id],
        [cls_id] + [(3 * i) % (len(vocab) - 5) + 5 for i in range(max_len - 2)] + [sep_id],  # longest input
        [cls_id, 8, 21, 22, 25, sep_id],
    ]
    cases = [rows[:4], [rows[4], rows[5], rows[1]], [rows[5]]]
    sentences = [
        ("The cat sat on the mat.", [cls_id, 5, 7, 9, 10, 5, 11, 16, sep_id]),
        ("Hello, world!", [cls_id, 12, 15, 13, 14, sep_id]),
        ("unaffable dog runs", [cls_id, 17, 18, 19, 8, 28, 29, sep_id]),
    ]
    tensors = {}
    all_cases = cases + [[ids] for _, ids in sentences]
    for i, batch in enumerate(all_cases):
        T = max(len(r) for r in batch)
        ids = torch.full((len(batch), T), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(batch), T), dtype=torch.int64)
        for b, r in enumerate(batch):
            ids[b, :len(r)] = torch.tensor(r)
            mask[b, :len(r)] = 1
        hidden, pooled = reference_forward(cfg, W, ids, mask, pooling)
        tensors["case%d.input_ids" % i] = ids
        tensors["case%d.attention_mask" % i] = mask
        tensors["case%d.hidden" % i] = hidden.to(torch.float32)
        tensors["case%d.pooled" % i] = pooled.to(torch.float32)
    write_safetensors(os.path.join(d, "reference.safetensors"), tensors)
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({"num_cases": len(cases), "sentences": [{"text": t, "ids": ids} for t, ids in sentences],
                   "pooling": pooling["name"], "hidden_size": cfg["hidden_size"],
                   "max_sequence_length": max_len}, f, indent=2)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_tiny_bert.py OUTDIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)

    bert = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": len(VOCAB) + 4,
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
            "hidden_act": "gelu", "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
            "pad_token_id": 0, "position_embedding_type": "absolute"}
    gen = torch.Generator().manual_seed(99)
    heads = {"bert.pooler.dense.weight": torch.randn(32, 32, generator=gen),
             "bert.pooler.dense.bias": torch.randn(32, generator=gen),
             "cls.predictions.bias": torch.randn(len(VOCAB) + 4, generator=gen),
             "cls.predictions.transform.dense.weight": torch.randn(32, 32, generator=gen)}
    make_model(out, "bert", bert, VOCAB, {"mode": "cls", "normalize": False, "name": "cls"}, prefix="bert.",
               extra=heads, seed=1)

    # RoBERTa-style: padding_idx 1, positions from padding_idx + 1, tanh GELU, sentence-transformers mean pooling +
    # Normalize, no prefix; its vocabulary starts with [CLS] [PAD] so the pad id is 1, named by tokenizer_config.json.
    roberta_vocab = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"] + VOCAB[5:]
    roberta = {"model_type": "roberta", "vocab_size": len(roberta_vocab), "hidden_size": 24, "num_hidden_layers": 3,
               "num_attention_heads": 2, "intermediate_size": 48, "hidden_act": "gelu_new",
               "max_position_embeddings": 14, "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1}
    st_files = {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}],
        "1_Pooling/config.json": {"word_embedding_dimension": 24, "pooling_mode_cls_token": False,
                                  "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                                  "pooling_mode_mean_sqrt_len_tokens": False},
        "tokenizer_config.json": {"do_lower_case": True, "cls_token": "[CLS]", "sep_token": "[SEP]",
                                  "pad_token": "[PAD]", "unk_token": "[UNK]"},
    }
    make_model(out, "roberta", roberta, roberta_vocab, {"mode": "mean", "normalize": True, "name": "mean+l2"},
               prefix="roberta.", files=st_files, seed=2)

    # ELECTRA: embedding_size != hidden_size (embeddings_project), relu, F16 weights, LayerNorm gamma/beta names.
    electra = {"model_type": "electra", "vocab_size": len(VOCAB), "embedding_size": 16, "hidden_size": 24,
               "num_hidden_layers": 1, "num_attention_heads": 3, "intermediate_size": 40, "hidden_act": "relu",
               "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0}
    make_model(out, "electra", electra, VOCAB, {"mode": "cls", "normalize": False, "name": "cls"},
               prefix="electra.", store_dtype=torch.float16, gamma_beta=True, seed=3)


if __name__ == "__main__":
    main()
