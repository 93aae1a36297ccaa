"""Log-probabilities in OpenAI's two shapes, as vLLM fills them.

Completions (`logprobs: k`): `tokens` (each token decoded alone), `token_logprobs`, `top_logprobs` (per
token a dict of the token itself and the k most likely, decoded; one entry fewer when the token is among
them) and `text_offset` (where each token's text starts, counting the decoded tokens before it). With
`echo`, the prompt's tokens come first; the first prompt token has nothing before it to be predicted from,
so its logprob and top_logprobs are null. Chat (`logprobs: true`, `top_logprobs: k`): `content`, per token
{token, logprob, bytes, top_logprobs: the k most likely as {token, logprob, bytes}}.

Values are the model's log-softmax (before penalties, bias, temperature or a grammar's mask: vLLM's
default `raw_logprobs`); -inf is sent as -9999.0, as vLLM does (JSON has no infinity).
"""

from __future__ import annotations

from typing import Any

from deepseek_lm.generate.logits_processing import TokenLogprobs

_FLOOR = -9999.0


class LogprobsWriter:
    """Turns the engine's `TokenLogprobs` into response fields, decoding token ids with `tokenizer`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion(self, entries: list[tuple[int, TokenLogprobs | None]], offset: int = 0) -> dict:
        """entries: (token id, its log-probabilities or None for an unscored first prompt token);
        `offset`: the text offset of the first one (a stream's text so far)."""
        out: dict[str, list] = dict(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token_id, lp in entries:
            text = self.token(token_id)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if lp is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_finite(lp.logprob))
            top = {text: _finite(lp.logprob)}
            for i, value in lp.top:
                top.setdefault(self.token(i), _finite(value))
            out["top_logprobs"].append(top)
        return out

    def chat(self, logprobs: list[TokenLogprobs]) -> list[dict]:
        return [
            dict(
                **self._chat_entry(lp.token, lp.logprob),
                top_logprobs=[self._chat_entry(i, v) for i, v in lp.top],
            )
            for lp in logprobs
        ]

    def _chat_entry(self, token_id: int, value: float) -> dict:
        text = self.token(token_id)
        return dict(token=text, logprob=_finite(value), bytes=list(text.encode("utf-8")))


def _finite(value: float) -> float:
    return max(value, _FLOOR)
