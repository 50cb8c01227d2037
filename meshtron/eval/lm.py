"""The two questions evaluation asks a model: how likely is this continuation, and what do you
generate after this prompt.

Log-likelihoods follow lm-evaluation-harness: context and continuation are tokenized
separately (the context with the tokenizer's special tokens, the continuation without), the
sum of the continuation tokens' log-probabilities is returned together with whether greedy
decoding would have produced exactly that continuation. Contexts that do not fit are cut
from the left.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from meshtron.infer.generation import SamplingParams, generate
from meshtron.infer.loading import LoadedModel
from meshtron.models.common.masks import AttentionMask


class EvalLM:
    def __init__(self, loaded: LoadedModel, batch_size: int = 8, chat_template: bool = False):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.stop_token_ids = loaded.stop_token_ids
        self.batch_size = batch_size
        self.chat_template = chat_template
        self.max_len = self.model.args.max_seq_len
        self.device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0

    def logits(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """The logits of a batch of rows, each one causal sequence; padding, when rows differ in length,
        comes after a row's tokens, where causality already hides it from them."""
        mask = AttentionMask.for_batch(tokens_BS.shape[1], backend=self.model.attention)
        return self.model(tokens_BS, mask=mask)

    def render(self, prompt: str) -> str:
        """The prompt as the model sees it: raw, or as one user turn of the chat template."""
        if not self.chat_template:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode_context(self, text: str) -> list[int]:
        # A rendered chat template already carries its special tokens.
        return self.tokenizer(text, add_special_tokens=not self.chat_template)["input_ids"]

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(sum of log-probs, greedy match) of each continuation given its context."""
        encoded = []
        for context, continuation in requests:
            ctx = self.encode_context(self.render(context))
            cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not cont:
                raise ValueError(f"continuation {continuation!r} encodes to no tokens")
            encoded.append((ctx, cont))
        results: list[tuple[float, bool] | None] = [None] * len(encoded)
        # Longest first: fewer padded positions per batch.
        order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, result in zip(batch, self._score_batch([encoded[i] for i in batch])):
                results[i] = result
        return results

    def _score_batch(self, pairs):
        seqs = []
        for ctx, cont in pairs:
            seq = (ctx + cont)[-(self.max_len + 1) :]
            seqs.append(seq[:-1])  # the last token is only a target
        width = max(len(s) for s in seqs)
        tokens = torch.full((len(seqs), width), self.pad_id, dtype=torch.long, device=self.device)
        for row, seq in enumerate(seqs):
            tokens[row, : len(seq)] = torch.tensor(seq, device=self.device)
        logprobs = F.log_softmax(self.logits(tokens).float(), dim=-1)
        out = []
        for row, ((ctx, cont), seq) in enumerate(zip(pairs, seqs)):
            n = len(cont)
            # Positions len(seq)-n .. len(seq)-1 predict the n continuation tokens.
            scores = logprobs[row, len(seq) - n : len(seq)]
            target = torch.tensor(cont, device=self.device)
            total = scores.gather(1, target[:, None]).sum().item()
            greedy = bool((scores.argmax(-1) == target).all())
            out.append((total, greedy))
        return out

    @torch.no_grad()
    def generate_until(
        self, prompts: Sequence[str], stop: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[str]:
        """Continuations (greedy unless a temperature is given), cut at the first stop string."""
        outputs: list[str] = []
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                stop_token_ids=self.stop_token_ids)
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            ids = [self.encode_context(self.render(p))[-(self.max_len - max_new_tokens) :] for p in chunk]
            for new in generate(self.model, ids, params, pad_id=self.pad_id):
                outputs.append(cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), stop))
        return outputs


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        idx = text.find(s)
        if idx != -1:
            cut = min(cut, idx)
    return text[:cut]
