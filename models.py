"""The three task models, built from blocks.Block: the MiniBERT classifier (and its masked-LM head), the causal
language model (generation with a KV cache) and the encoder-decoder (greedy and beam search).

Shapes: B batch, T sequence length, C model width (d_model), E experts, K experts per token (top_k),
N tokens routed (B*T minus padding), H heads, D head width (C // H).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from blocks import Block, RMSNorm, init_weights, reorder_cache, run_blocks, task_loss
from config import MODEL_CONFIGS, ModelConfig
from moe import MoE
from sampling import sample_next, strip_eos


def count_params(model: nn.Module, config: ModelConfig) -> tuple[int, int]:
    """(total, active): active counts only top_k of the routed experts of each MoE layer (plus the router and
    the shared experts)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = sum(p.numel() for p in m.experts.parameters()) // m.num_experts
            inactive += per_expert * (m.num_experts - m.top_k)
    return total, total - inactive


# -----------------------------------------------------------------------------
# Classifier (MiniBERT-MoE)

class Classifier(nn.Module):
    """Token + position + segment embeddings, N pre-norm blocks, [CLS] or mean pooling, a linear head.

    With num_layers=0 it is the small model: mean of the token embeddings -> one MoE (or dense) layer -> head.
    """
    grad_checkpoint = False  # set by the trainer (TrainConfig.grad_checkpoint)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        C = config.d_model
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.pos_emb = nn.Embedding(config.max_len, C) if config.num_layers else None
        self.seg_emb = nn.Embedding(config.type_vocab_size, C) if config.num_layers else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, config.is_moe_layer(i)) for i in range(config.num_layers))
        if config.num_layers == 0:
            # the pooled model: one feed-forward layer over the pooled embedding, residual like a block
            self.pooled_ffn = Block(config, config.num_experts > 0).ffn
        self.norm = RMSNorm(C)
        self.head = nn.Linear(C, config.num_classes)
        self.ngram = nn.Embedding(config.ngram_buckets, config.num_classes) if config.ngram_buckets else None
        if config.wide_vocab:  # wide & deep: the TF-IDF linear model, plus the encoder's logits times deep_scale
            self.wide = nn.Embedding(config.wide_vocab, config.num_classes)
            self.wide_bias = nn.Parameter(torch.zeros(config.num_classes))
            self.deep_scale = nn.Parameter(torch.zeros(()))
        init_weights(self, config.num_layers)
        if self.ngram is not None:
            nn.init.zeros_(self.ngram.weight)  # at step 0 the model is the deep part alone
        if config.wide_vocab:
            nn.init.zeros_(self.wide.weight)  # the task sets it to the fitted linear model (ClsData.init_model)

    def encode(self, input_ids, attention_mask, token_type_ids=None):
        """input_ids, attention_mask (B, T) -> hidden states (B, T, C) after the final norm, MoE stats."""
        B, T = input_ids.shape
        mask = attention_mask.bool()
        x = self.tok_emb(input_ids) + self.pos_emb(torch.arange(T, device=input_ids.device))[None]  # (B, T, C)
        if token_type_ids is not None:
            x = x + self.seg_emb(token_type_ids)
        x, stats = run_blocks(self.blocks, self.drop(x), self.grad_checkpoint, mask=mask)
        return self.norm(x), stats

    def forward(self, input_ids, attention_mask, wide_ids=None, wide_values=None, labels=None, token_type_ids=None,
                label_smoothing=0.0):
        """input_ids, attention_mask (B, T); with a wide part, the texts' TF-IDF rows wide_ids, wide_values
        (B, F) -> logits (B, classes), loss (CE + aux) or None, info dict (info["wide_logits"]: the wide part's
        share of the logits). Without wide inputs a wide model gives the deep part's share alone."""
        deep, stats = self.deep_logits(input_ids, attention_mask, token_type_ids)
        if not self.config.wide_vocab:
            return deep, *task_loss(deep, labels, stats, label_smoothing)
        if wide_ids is None:
            deep = self.deep_scale * deep
            return deep, *task_loss(deep, labels, stats, label_smoothing)
        wide = self.wide_logits(wide_ids, wide_values)
        training = self.config.deep_training
        logits = wide + self.deep_scale * (deep.detach() if training == "own" else deep)
        loss, info = task_loss(logits, labels, stats, label_smoothing)
        if loss is not None and training != "joint":  # the deep part learns the task on its own logits too
            loss = loss + F.cross_entropy(deep, labels, label_smoothing=label_smoothing)
        info["wide_logits"] = wide.detach()
        return logits, loss, info

    def wide_logits(self, wide_ids, wide_values):
        """TF-IDF rows (B, F) (id 0 / value 0.0 in the padding) -> the linear model's logits (B, classes)."""
        return (self.wide(wide_ids) * wide_values[..., None].float()).sum(1) + self.wide_bias

    def deep_logits(self, input_ids, attention_mask, token_type_ids=None):
        """The encoder's logits (B, classes) (with the hashed n-gram part, when the config has one), MoE stats."""
        mask = attention_mask.bool()
        if self.config.num_layers:
            x, stats = self.encode(input_ids, attention_mask, token_type_ids)
            pooled = x[:, 0] if self.config.pooling == "cls" else masked_mean(x, mask)
        else:
            stats = []
            pooled = self.drop(masked_mean(self.tok_emb(input_ids), mask))  # (B, C)
            h = pooled[:, None]  # (B, 1, C): one "token" per text for the MoE
            if isinstance(self.pooled_ffn, MoE):
                y, s = self.pooled_ffn(h)
                stats.append(s)
            else:
                y = self.pooled_ffn(h)
            pooled = self.norm(pooled + y[:, 0])
        logits = self.head(self.drop(pooled)).float()  # (B, classes)
        if self.ngram is not None:
            logits = logits + self.hashed_ngrams(input_ids, mask)
        return logits, stats

    def hashed_ngrams(self, input_ids, mask):
        """The linear part: each token 1-, 2- and 3-gram hashed to one of ngram_buckets rows of class weights,
        summed over the text / sqrt(count) -> logits (B, classes). Token n-grams of the byte-level BPE span about
        1-5 characters, the features a TF-IDF + linear SVM baseline uses; here they train with the encoder."""
        ids = input_ids.long()
        grams, valid = [ids], [mask]
        for n in (2, 3):  # polynomial rolling hash of the n tokens (fits int64 for ids < 2^16)
            grams.append(grams[-1][:, :-1] * 1_000_003 + ids[:, n - 1:])
            valid.append(valid[-1][:, :-1] & mask[:, n - 1:])
        rows = torch.cat([(g * 31 + n) % self.config.ngram_buckets for n, g in enumerate(grams, 1)], 1)  # (B, N)
        keep = torch.cat(valid, 1).to(self.ngram.weight.dtype)  # (B, N)
        summed = (self.ngram(rows) * keep[..., None]).sum(1)  # (B, classes)
        return (summed / keep.sum(1, keepdim=True).clamp(min=1).sqrt()).float()

    def mlm(self, input_ids, attention_mask, labels, label_smoothing=0.0):
        """Masked-LM pretraining of the encoder (BERT): predict the original token where labels != -100.

        The output layer is the token embedding (tied), so pretraining adds no parameters to the classifier.
        """
        if not self.config.num_layers:
            raise ValueError("masked-LM pretraining needs num_layers > 0")
        x, stats = self.encode(input_ids, attention_mask)
        picked = labels != -100
        logits = (x[picked] @ self.tok_emb.weight.t()).float()  # (masked tokens, vocab)
        return logits, *task_loss(logits, labels[picked], stats, label_smoothing)


class MaskedLM(nn.Module):
    """View of a Classifier whose forward is the masked-LM objective, so the one training loop can run it."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids, attention_mask, labels, label_smoothing=0.0):
        return self.classifier.mlm(input_ids, attention_mask, labels, label_smoothing)

    @property
    def grad_checkpoint(self) -> bool:  # the trainer sets it on the model it runs: pass it to the encoder
        return self.classifier.grad_checkpoint

    @grad_checkpoint.setter
    def grad_checkpoint(self, on: bool):
        self.classifier.grad_checkpoint = on


def masked_mean(x, mask):
    """x (B, T, C), mask (B, T) -> (B, C) mean over real tokens."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


# -----------------------------------------------------------------------------
# Language model (decoder-only, noisy top-k MoE)

class LanguageModel(nn.Module):
    """GPT-style decoder: token + position embeddings, causal pre-norm blocks, tied output embedding."""
    grad_checkpoint = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        C = config.d_model
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.pos_emb = nn.Embedding(config.max_len, C)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, config.is_moe_layer(i), causal=True)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(C)
        init_weights(self, config.num_layers)

    def forward(self, idx, targets=None, caches=None, label_smoothing=0.0):
        """idx (B, T) -> logits (B, T, V), loss (CE + aux) or None, info.

        `caches`: one dict per block (see Attention); with caches, idx continues the cached sequence.
        """
        B, T = idx.shape
        past = caches[0].get("self", {}).get("k").size(2) if caches and caches[0].get("self") else 0
        if past + T > self.config.max_len:
            raise ValueError(f"sequence of {past + T} tokens is longer than max_len={self.config.max_len}")
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos)[None])  # (B, T, C)
        x, stats = run_blocks(self.blocks, x, self.grad_checkpoint, caches, causal=True)
        logits = (self.norm(x) @ self.tok_emb.weight.t()).float()  # (B, T, V), tied embedding
        return logits, *task_loss(logits, targets, stats, label_smoothing)

    @torch.inference_mode()  # no autograd bookkeeping at all: ~20% faster per decoding step than no_grad
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_id: int | None = None, generator=None, use_cache: bool = True):
        """Yield new token ids one at a time (B=1). With the KV cache each step feeds only the newest token.

        When the context window fills up, the last half of it is re-encoded and decoding goes on from there.
        """
        self.eval()
        window = self.config.max_len
        seq = idx[:, -window:]
        caches = [{} for _ in self.blocks] if use_cache else None
        logits, _, _ = self(seq, caches=caches)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B, 1)
            yield int(nxt[0, 0])
            if eos_id is not None and int(nxt[0, 0]) == eos_id:
                return
            seq = torch.cat([seq, nxt], dim=1)
            if seq.size(1) > window:  # re-encode the recent half: absolute positions must restart
                seq = seq[:, -(window // 2):]
                caches = [{} for _ in self.blocks] if use_cache else None
                logits, _, _ = self(seq, caches=caches)
            elif use_cache:
                logits, _, _ = self(nxt, caches=caches)
            else:
                logits, _, _ = self(seq)


# -----------------------------------------------------------------------------
# Seq2seq (encoder-decoder, MoE in both stacks)

class Seq2Seq(nn.Module):
    """Encoder (bidirectional, padding mask) + decoder (causal self-attention with KV cache, cross-attention to
    the encoder). One tokenizer for both sides, so one token embedding: it is shared by the encoder, the decoder
    and the output layer (tied). Which layers of each stack are MoE follows `moe_layers`, by index in the stack.
    """
    grad_checkpoint = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        C, n_dec = config.d_model, config.decoder_layers or config.num_layers
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.enc_pos = None if config.rope else nn.Embedding(config.max_len, C)
        self.dec_pos = None if config.rope else nn.Embedding(config.max_len, C)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(Block(config, config.is_moe_layer(i)) for i in range(config.num_layers))
        self.decoder = nn.ModuleList(Block(config, config.is_moe_layer(i), cross=True, causal=True)
                                     for i in range(n_dec))
        self.enc_norm = RMSNorm(C)
        self.dec_norm = RMSNorm(C)
        init_weights(self, config.num_layers + n_dec)

    def encode(self, input_ids, attention_mask):
        """input_ids, attention_mask (B, S) -> memory (B, S, C), MoE stats."""
        pos = torch.arange(input_ids.size(1), device=input_ids.device)
        x = self.tok_emb(input_ids) + (self.enc_pos(pos)[None] if self.enc_pos is not None else 0)
        x, stats = run_blocks(self.encoder, self.drop(x), self.grad_checkpoint, mask=attention_mask.bool(), pos=pos)
        return self.enc_norm(x), stats

    def decode(self, decoder_input_ids, memory, attention_mask, decoder_attention_mask=None, caches=None):
        """decoder_input_ids (B, T) continuing the cached prefix -> logits (B, T, V), MoE stats."""
        T = decoder_input_ids.size(1)
        past = caches[0]["self"]["k"].size(2) if caches and caches[0].get("self") else 0
        if past + T > self.config.max_len:
            raise ValueError(f"target of {past + T} tokens is longer than max_len={self.config.max_len}")
        pos = torch.arange(past, past + T, device=decoder_input_ids.device)
        x = self.tok_emb(decoder_input_ids) + (self.dec_pos(pos)[None] if self.dec_pos is not None else 0)
        mask = decoder_attention_mask.bool() if decoder_attention_mask is not None else None
        x, stats = run_blocks(self.decoder, self.drop(x), self.grad_checkpoint, caches, mask=mask, causal=True,
                              context=memory, context_mask=attention_mask.bool(), pos=pos)
        return (self.dec_norm(x) @ self.tok_emb.weight.t()).float(), stats  # tied output layer

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None, labels=None,
                label_smoothing=0.0):
        """Teacher forcing. labels (B, T): the next target token, -100 on padding -> logits, loss, info."""
        memory, enc_stats = self.encode(input_ids, attention_mask)
        logits, dec_stats = self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)
        return logits, *task_loss(logits, labels, enc_stats + dec_stats, label_smoothing)

    def _start(self, input_ids, attention_mask, bos_id: int, use_cache: bool):
        memory, _ = self.encode(input_ids, attention_mask)
        tokens = torch.full((input_ids.size(0), 1), bos_id, dtype=torch.long, device=input_ids.device)
        return memory, tokens, [{} for _ in self.decoder] if use_cache else None

    def _next_logprobs(self, tokens, memory, attention_mask, caches):
        """Log-probabilities of the next token (B, V): with caches only the newest token is fed."""
        logits, _ = self.decode(tokens[:, -1:] if caches is not None else tokens, memory, attention_mask,
                                caches=caches)
        return logits[:, -1].log_softmax(-1)

    @torch.inference_mode()
    def greedy(self, input_ids, attention_mask, bos_id: int, eos_id: int, max_new_tokens: int,
               use_cache: bool = True) -> list[list[int]]:
        """Batched greedy decoding -> one list of target ids per source (without bos/eos).

        The encoder runs once; the cross-attention keys/values are computed on the first step and cached."""
        self.eval()
        max_new_tokens = min(max_new_tokens, self.config.max_len - 1)
        memory, tokens, caches = self._start(input_ids, attention_mask, bos_id, use_cache)
        done = torch.zeros(tokens.size(0), dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            nxt = self._next_logprobs(tokens, memory, attention_mask, caches).argmax(-1)  # (B,)
            nxt = nxt.masked_fill(done, eos_id)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if done.all():
                break
        return [strip_eos(row, eos_id) for row in tokens[:, 1:].tolist()]

    @torch.inference_mode()
    def beam_search(self, input_ids, attention_mask, bos_id: int, eos_id: int, max_new_tokens: int,
                    beam_size: int = 4, length_penalty: float = 1.0) -> list[list[int]]:
        """Batched beam search with the KV cache -> the best hypothesis per source (without bos/eos)."""
        return [hyps[0][1] for hyps in self.beam_hypotheses(input_ids, attention_mask, bos_id, eos_id,
                                                            max_new_tokens, beam_size, length_penalty)]

    @torch.inference_mode()
    def beam_hypotheses(self, input_ids, attention_mask, bos_id: int, eos_id: int, max_new_tokens: int,
                        beam_size: int = 4, length_penalty: float = 1.0,
                        fusion=None) -> list[list[tuple[float, list[int]]]]:
        """Batched beam search with the KV cache -> per source, its finished hypotheses as (score, ids without
        bos/eos), best first: the candidates an input method shows.

        A hypothesis' score is its summed log-probability / length ** length_penalty. Each source keeps
        `beam_size` live beams; a source is done once it has `beam_size` finished hypotheses (early stopping).
        `fusion`: a callable from the live beams' target ids (lists without bos) to a (rows, V) tensor added to the
        model's log-probabilities at every step: shallow fusion's weight * log P_LM, the pinyin constraint's
        0 / -inf (task_s2s.fusion_term).
        """
        self.eval()
        B, W = input_ids.size(0), beam_size
        max_new_tokens = min(max_new_tokens, self.config.max_len - 1)
        memory, tokens, caches = self._start(input_ids.repeat_interleave(W, 0),
                                             attention_mask.repeat_interleave(W, 0), bos_id, True)
        mask = attention_mask.repeat_interleave(W, 0)  # (B*W, S): beams of one source are adjacent
        scores = torch.zeros(B, W, device=tokens.device)
        scores[:, 1:] = float("-inf")  # all beams start as the same "<bos>": expand only the first
        finished = [[] for _ in range(B)]  # (normalised score, ids) per source
        done = [False] * B
        for _ in range(max_new_tokens):
            logp = self._next_logprobs(tokens, memory, mask, caches)  # (B*W, V)
            if fusion is not None:
                logp = logp + fusion(tokens[:, 1:].tolist()).to(logp)
            V = logp.size(-1)
            cand = (scores.view(-1, 1) + logp).view(B, W * V)
            top_scores, top_idx = cand.topk(2 * W, dim=-1)  # 2W: enough to refill W beams after eos picks
            new_scores = torch.full((B, W), float("-inf"), device=tokens.device)
            new_from = torch.arange(W, device=tokens.device).repeat(B, 1)  # (B, W) beam each new one extends
            new_tok = torch.full((B, W), eos_id, dtype=torch.long, device=tokens.device)
            for b in range(B):
                if done[b]:
                    continue
                k = 0
                for s, i in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                    if s == float("-inf"):
                        break
                    beam, tok = divmod(i, V)
                    if tok == eos_id:
                        seq = tokens[b * W + beam, 1:].tolist()
                        finished[b].append((s / (len(seq) + 1) ** length_penalty, seq))
                    else:
                        new_scores[b, k], new_from[b, k], new_tok[b, k] = s, beam, tok
                        k += 1
                        if k == W:
                            break
                done[b] = len(finished[b]) >= W
            if all(done):
                break
            rows = (torch.arange(B, device=tokens.device)[:, None] * W + new_from).view(-1)  # (B*W,)
            tokens = torch.cat([tokens[rows], new_tok.view(-1, 1)], dim=1)
            for cache in caches:  # reorder the self-attention cache; cross K/V are the same for a source's beams
                reorder_cache(cache["self"], rows)
            scores = new_scores
        out = []
        for b in range(B):
            if not finished[b]:  # ran out of length: rank the live beams the same way
                L = tokens.size(1) - 1
                finished[b] = [(float(scores[b, w]) / L ** length_penalty, tokens[b * W + w, 1:].tolist())
                               for w in range(W) if scores[b, w] > float("-inf")]
            out.append(sorted(finished[b], key=lambda f: -f[0]))
        return out


def build_model(task: str, config: ModelConfig) -> nn.Module:
    if not isinstance(config, MODEL_CONFIGS.get(task, ModelConfig)):
        raise TypeError(f"a {task} model needs a {MODEL_CONFIGS[task].__name__}, not a {type(config).__name__}")
    if task == "cls":
        return Classifier(config)
    if task == "lm":
        return LanguageModel(config)
    if task == "seq2seq":
        return Seq2Seq(config)
    raise ValueError(f"unknown task {task!r}")
