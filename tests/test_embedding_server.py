"""Issue 7 over HTTP: embedding and reward models served by real servers on loopback.

- all-MiniLM-L6-v2 (real weights, the BERT encoder path): /encode and /v1/embeddings
  against sentence-transformers' vectors for 20 varied sentences.
- tiny-qwen2 with --is-embedding (gte-Qwen2 style: last token, L2-normalised)
  against HF's pooled hidden state.
- tiny-llama-reward (LlamaForSequenceClassification, one label): /classify on the
  reference notebook's two chat-templated conversations against HF's logits.
- 200 requests from 16 concurrent clients give the vectors of one-at-a-time requests.
- The error cases answer 400 with their messages.

References are the fixtures' stored HF outputs (tests/conftest.py, `reference(name)`).
"""

from __future__ import annotations

import base64
import concurrent.futures
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest
import requests

from tests import fixture_spec as spec
from tests.conftest import fixture_path, load_reference
from tests.server_helpers import ServerProcess, start_server, wait_idle

COSINE_MIN = 0.9999
SCORE_RTOL = 1e-4
NUM_CONCURRENT_REQUESTS = 200
NUM_CLIENTS = 16
# Batching changes the padded shapes (other XLA programs, other summation orders): same vector up to this.
CONCURRENT_ATOL = 1e-5
CHUNK = 64  # --chunked-prefill-size of the Qwen2 embedding server: prompts longer than this are chunked

NO_INPUT = "Either text, input_ids or input_embeds should be provided."
BOTH_INPUTS = "text and input_ids cannot be provided at the same time"
NOT_EMBEDDING = (
    "This model does not appear to be an embedding model by default. Please add `--is-embedding` "
    "when launching the server or try another model."
)


def _serve(tmp_path_factory: pytest.TempPathFactory, name: str, *flags: str) -> Iterator[ServerProcess]:
    folder = fixture_path(name)
    server = start_server(folder, *flags, log_dir=tmp_path_factory.mktemp(f"log-{name}"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _serve(tmp_path_factory, spec.MINILM)


@pytest.fixture(scope="module")
def qwen2_embed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _serve(
        tmp_path_factory, spec.TINY_QWEN2, "--is-embedding", "--chunked-prefill-size", str(CHUNK)
    )


@pytest.fixture(scope="module")
def reward(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _serve(tmp_path_factory, spec.TINY_LLAMA_REWARD, "--is-embedding")


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _serve(tmp_path_factory, spec.TINY_LLAMA)


def cosine(a: Any, b: Any) -> float:
    x = np.asarray(a, np.float64)
    y = np.asarray(b, np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def post_ok(server: ServerProcess, route: str, body: Any) -> Any:
    r = server.post(route, body)
    assert r.status_code == 200, f"{route} answered {r.status_code}: {r.text[:500]}"
    return r.json()


def check_embedding_answer(answer: dict[str, Any], prompt_tokens: int | None = None) -> np.ndarray:
    """The native /encode answer shape (NATIVE_API.md); returns the vector."""
    assert set(answer) == {"embedding", "meta_info"}, answer.keys()
    meta = answer["meta_info"]
    assert {"id", "finish_reason", "prompt_tokens", "e2e_latency"} <= set(meta), meta
    assert meta["finish_reason"] == {"type": "length", "length": 0}, meta
    if prompt_tokens is not None:
        assert meta["prompt_tokens"] == prompt_tokens, meta
    vector = np.asarray(answer["embedding"], np.float64)
    assert vector.ndim == 1 and np.isfinite(vector).all(), answer["embedding"][:8]
    return vector


# ----------------------------------------------------------------------------- all-MiniLM-L6-v2


def test_minilm_single_matches_sentence_transformers(minilm: ServerProcess) -> None:
    ref = load_reference(spec.MINILM)
    sentences, expected, ids = ref["sentences"], ref["embeddings"], ref["input_ids"]
    assert len(sentences) == 20 and expected.shape == (20, 384)
    worst = []
    for i, sentence in enumerate(sentences):
        vector = check_embedding_answer(post_ok(minilm, "/encode", {"text": sentence}), len(ids[i]))
        assert vector.shape == (384,)
        worst.append(cosine(vector, expected[i]))
        # sentence-transformers' Normalize module: unit vectors.
        assert abs(np.linalg.norm(vector) - 1.0) < 1e-4, (i, np.linalg.norm(vector))
    assert min(worst) > COSINE_MIN, {i: c for i, c in enumerate(worst) if c <= COSINE_MIN}


def test_minilm_batched_matches_and_keeps_order(minilm: ServerProcess) -> None:
    ref = load_reference(spec.MINILM)
    answers = post_ok(minilm, "/encode", {"text": ref["sentences"], "model": "ignored"})
    assert isinstance(answers, list) and len(answers) == 20
    for i, answer in enumerate(answers):
        vector = check_embedding_answer(answer, len(ref["input_ids"][i]))
        assert cosine(vector, ref["embeddings"][i]) > COSINE_MIN, (i, ref["sentences"][i])
    # input_ids give the same vectors as the text they encode.
    by_ids = post_ok(minilm, "/encode", {"input_ids": ref["input_ids"][:5]})
    for i, answer in enumerate(by_ids):
        assert cosine(answer["embedding"], ref["embeddings"][i]) > COSINE_MIN, i


def test_minilm_openai_embeddings(minilm: ServerProcess) -> None:
    ref = load_reference(spec.MINILM)
    client = openai.OpenAI(base_url=minilm.url + "/v1", api_key="none", timeout=120)
    response = client.embeddings.create(model=spec.MINILM, input=ref["sentences"])
    assert response.object == "list" and len(response.data) == 20
    assert [d.index for d in response.data] == list(range(20))
    for i, item in enumerate(response.data):
        assert cosine(item.embedding, ref["embeddings"][i]) > COSINE_MIN, (i, ref["sentences"][i])
    assert response.usage.prompt_tokens == sum(len(x) for x in ref["input_ids"])
    single = client.embeddings.create(model=spec.MINILM, input=ref["sentences"][0])
    assert len(single.data) == 1 and cosine(single.data[0].embedding, ref["embeddings"][0]) > COSINE_MIN
    # base64 (the openai client's default wire format when numpy is around) decodes to the same floats.
    raw = requests.post(
        minilm.url + "/v1/embeddings",
        json={"model": "m", "input": ref["sentences"][1], "encoding_format": "base64"},
        timeout=120,
    )
    assert raw.status_code == 200, raw.text
    decoded = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), "<f4")
    assert cosine(decoded, ref["embeddings"][1]) > COSINE_MIN
    # `dimensions` at the model's own size is served; a shorter one is a 400 naming the size;
    # an explicit null encoding format is the default (float).
    sized = client.embeddings.create(
        model=spec.MINILM, input="a cat", dimensions=384, encoding_format="float"
    )
    assert len(sized.data[0].embedding) == 384
    served = minilm.get("/get_server_info").json()["num_served"]
    with pytest.raises(openai.BadRequestError, match="this model's embeddings have 384 dimensions"):
        client.embeddings.create(model=spec.MINILM, input=["a cat"] * 50, dimensions=64)
    assert minilm.get("/get_server_info").json()["num_served"] == served  # refused before it ran
    nulls = minilm.post("/v1/embeddings", {"input": "a cat", "encoding_format": None, "dimensions": None})
    assert nulls.status_code == 200 and len(nulls.json()["data"][0]["embedding"]) == 384, nulls.text


def test_minilm_aborts_the_queued_texts_of_a_batch(minilm: ServerProcess) -> None:
    """An encoder's queued requests end at an abort (and at a client's disconnect) instead of being
    encoded: a batch of 3000 texts (seconds of work) aborted just after it arrives answers at
    once, and a request after it does not wait for the abandoned texts."""
    texts = [f"sentence number {i} about nothing in particular" for i in range(3000)]
    served_before = minilm.get("/get_server_info").json()["num_served"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        batch = pool.submit(minilm.post, "/encode", {"text": texts, "rid": "big-batch"})
        deadline = time.monotonic() + 30
        while minilm.get("/get_server_info").json()["num_queue_reqs"] < 1000:
            assert time.monotonic() < deadline and not batch.done(), "the batch never queued"
        assert minilm.post("/abort_request", {"rid": "big-batch"}).status_code == 200
        answers = batch.result(timeout=60).json()
    reasons = [answer["meta_info"]["finish_reason"]["type"] for answer in answers]
    assert len(reasons) == 3000 and reasons.count("abort") > 1000, reasons.count("abort")
    assert all(
        answer["embedding"] == []
        for answer in answers
        if answer["meta_info"]["finish_reason"]["type"] == "abort"
    )
    started = time.monotonic()
    assert minilm.post("/encode", {"text": "after the abort"}).status_code == 200
    assert time.monotonic() - started < 2.0
    served = minilm.get("/get_server_info").json()["num_served"] - served_before
    assert served < 2000, served


# ----------------------------------------------------------------------------- tiny-qwen2, last-token pooling


def flush_cache(server: ServerProcess) -> None:
    """Empty the prefix cache so the next request computes every prompt token."""
    wait_idle(server)
    r = server.post("/flush_cache")
    assert r.status_code == 200, r.text


def qwen2_prompts() -> list[list[int]]:
    ref = load_reference(spec.TINY_QWEN2)
    return [ref[f"prompt_{i}"].tolist() for i in range(ref["num_prompts"])]


def test_qwen2_last_token_embeddings_match_hf(qwen2_embed: ServerProcess) -> None:
    """Cold prefix cache: HF's final-norm hidden state of the last token, L2-normalised."""
    ref = load_reference(spec.TINY_QWEN2)
    info = qwen2_embed.get("/get_model_info").json()
    assert info["is_generation"] is False, info
    prompts = qwen2_prompts()
    for i, ids in enumerate(prompts):
        flush_cache(qwen2_embed)
        vector = check_embedding_answer(post_ok(qwen2_embed, "/encode", {"input_ids": ids}), len(ids))
        expected = ref[f"embedding_{i}"]
        assert vector.shape == expected.shape, (vector.shape, expected.shape)
        assert cosine(vector, expected) > COSINE_MIN, (i, cosine(vector, expected))
        assert abs(np.linalg.norm(vector) - 1.0) < 1e-4
    flush_cache(qwen2_embed)
    answers = post_ok(qwen2_embed, "/encode", {"input_ids": prompts})
    assert len(answers) == len(prompts)
    for i, answer in enumerate(answers):
        assert cosine(answer["embedding"], ref[f"embedding_{i}"]) > COSINE_MIN, i


def test_qwen2_embeddings_with_a_warm_prefix_cache(qwen2_embed: ServerProcess) -> None:
    """The same prompts again, now with their prefixes cached: the same vectors.

    A 33-token prompt finds 32 tokens (two pages) cached and has one token left to
    compute; that must still pool, not be treated as a decode row.
    """
    ref = load_reference(spec.TINY_QWEN2)
    prompts = qwen2_prompts()
    flush_cache(qwen2_embed)
    post_ok(qwen2_embed, "/encode", {"input_ids": prompts})
    for _ in range(2):
        answers = post_ok(qwen2_embed, "/encode", {"input_ids": prompts})
        for i, answer in enumerate(answers):
            assert len(answer["embedding"]) == ref[f"embedding_{i}"].shape[0], (
                f"prompt {i} ({len(prompts[i])} tokens, cached_tokens leave one to compute): empty embedding "
                f"{answer['embedding']!r} -- engine bug: the scheduler admits a non-generation request with "
                "one token left as a decode row (sampled), so it never pools"
            )
            assert cosine(answer["embedding"], ref[f"embedding_{i}"]) > COSINE_MIN, i


def test_qwen2_embedding_prompt_one_token_past_a_prefill_chunk(qwen2_embed: ServerProcess) -> None:
    """A prompt of chunk + 1 tokens: the last chunk is a single token, and it must still finish."""
    ids = [1000 + 7 * i for i in range(CHUNK + 1)]
    flush_cache(qwen2_embed)
    try:
        r = requests.post(qwen2_embed.url + "/encode", json={"input_ids": ids}, timeout=20)
    except requests.exceptions.Timeout:
        pytest.fail(
            f"/encode of {len(ids)} tokens with --chunked-prefill-size {CHUNK} never answered -- engine bug: "
            "after the first chunk one token is left, and the scheduler neither prefills (remaining > 1) nor "
            "decodes (not a generation request) it"
        )
    assert r.status_code == 200, r.text
    assert len(r.json()["embedding"]) == 96


def test_qwen2_openai_embeddings_with_token_ids(qwen2_embed: ServerProcess) -> None:
    ref = load_reference(spec.TINY_QWEN2)
    client = openai.OpenAI(base_url=qwen2_embed.url + "/v1", api_key="none", timeout=120)
    prompts = qwen2_prompts()
    flush_cache(qwen2_embed)
    response = client.embeddings.create(model="tiny-qwen2", input=prompts, encoding_format="float")
    assert len(response.data) == len(prompts)
    for i, item in enumerate(response.data):
        assert cosine(item.embedding, ref[f"embedding_{i}"]) > COSINE_MIN, i
    assert response.usage.prompt_tokens == sum(len(p) for p in prompts)


# ----------------------------------------------------------------------------- reward model


def test_reward_model_scores_conversations(reward: ServerProcess) -> None:
    ref = load_reference(spec.TINY_LLAMA_REWARD)
    conversations = [ref["conv_ids_0"].tolist(), ref["conv_ids_1"].tolist()]
    expected = [float(ref["conv_score_0"][0]), float(ref["conv_score_1"][0])]

    def check(answers: Any, how: str) -> None:
        assert isinstance(answers, list) and len(answers) == 2, answers
        for i, answer in enumerate(answers):
            reason = answer["meta_info"]["finish_reason"]
            assert reason.get("type") != "abort", f"{how}: the engine aborted conversation {i}: {reason}"
            scores = check_embedding_answer(answer, len(conversations[i]))
            assert scores.shape == (1,), f"{how}: a reward model answers [score], got {answer['embedding']}"
            err = abs(scores[0] - expected[i]) / abs(expected[i])
            assert err < SCORE_RTOL, (
                f"{how}: conversation {i}: {scores[0]} vs HF {expected[i]} (rel {err:.2e})"
            )

    check(post_ok(reward, "/classify", {"input_ids": conversations}), "input_ids")
    # The notebook's way: the chat-templated texts, tokenized by the server.
    check(post_ok(reward, "/classify", {"text": ref["conversation_texts"]}), "text")
    # Input order is kept when the order is reversed.
    reversed_answers = post_ok(reward, "/classify", {"input_ids": conversations[::-1]})
    assert abs(reversed_answers[0]["embedding"][0] - expected[1]) < SCORE_RTOL * abs(expected[1])
    assert abs(reversed_answers[1]["embedding"][0] - expected[0]) < SCORE_RTOL * abs(expected[0])
    # The random prompts too, one at a time.
    for i in range(ref["num_prompts"]):
        answer = post_ok(reward, "/classify", {"input_ids": ref[f"prompt_{i}"].tolist()})
        want = float(ref[f"score_{i}"][0])
        assert abs(answer["embedding"][0] - want) < SCORE_RTOL * abs(want), (i, answer["embedding"], want)


# ----------------------------------------------------------------------------- concurrency


def _concurrent_vectors(server: ServerProcess, bodies: list[dict[str, Any]]) -> list[np.ndarray]:
    def one(body: dict[str, Any]) -> np.ndarray:
        r = requests.post(server.url + "/encode", json=body, timeout=300)
        assert r.status_code == 200, f"{r.status_code}: {r.text[:300]}"
        return np.asarray(r.json()["embedding"], np.float64)

    with concurrent.futures.ThreadPoolExecutor(NUM_CLIENTS) as pool:
        return list(pool.map(one, bodies))


@pytest.mark.parametrize("which", ["minilm", "qwen2_embed"])
def test_concurrent_clients_get_the_same_vectors(which: str, request: pytest.FixtureRequest) -> None:
    server: ServerProcess = request.getfixturevalue(which)
    sentences = list(load_reference(spec.MINILM)["sentences"])
    alone = []
    for sentence in sentences:
        flush_cache(server)  # one at a time, every token computed
        answer = post_ok(server, "/encode", {"text": sentence})
        alone.append(check_embedding_answer(answer))
        assert alone[-1].size > 0, (
            f"empty embedding for {sentence!r} ({answer['meta_info']['prompt_tokens']} tokens) with a cold "
            "cache -- engine bug: a non-generation request with one token to compute is scheduled as a "
            "decode row and never pooled"
        )
    bodies = [{"text": sentences[i % len(sentences)]} for i in range(NUM_CONCURRENT_REQUESTS)]
    together = _concurrent_vectors(server, bodies)
    assert len(together) == NUM_CONCURRENT_REQUESTS
    worst = 0.0
    for i, vector in enumerate(together):
        expected = alone[i % len(sentences)]
        assert vector.shape == expected.shape, (
            f"request {i} ({sentences[i % len(sentences)]!r}): embedding of shape {vector.shape}, alone "
            f"{expected.shape} (an empty one is the scheduler's one-token-left bug, see the warm-cache test)"
        )
        worst = max(worst, float(np.max(np.abs(vector - expected))))
    assert worst < CONCURRENT_ATOL, f"concurrent vectors differ from one-at-a-time ones by {worst:.3g}"


# ----------------------------------------------------------------------------- errors


def _error(r: requests.Response) -> str:
    assert r.status_code == 400, f"expected 400, got {r.status_code}: {r.text[:300]}"
    return r.json()["error"]["message"]


@pytest.mark.parametrize("route", ["/encode", "/classify"])
def test_missing_or_double_input(route: str, qwen2_embed: ServerProcess) -> None:
    assert _error(qwen2_embed.post(route, {})) == NO_INPUT
    assert _error(qwen2_embed.post(route, {"model": "x"})) == NO_INPUT
    assert _error(qwen2_embed.post(route, {"text": "a", "input_ids": [1, 2]})) == BOTH_INPUTS
    # The server keeps serving after the errors.
    assert qwen2_embed.post(route, {"input_ids": [101, 102]}).status_code == 200


def test_encode_on_a_generation_model(generator: ServerProcess) -> None:
    for route in ("/encode", "/classify"):
        assert _error(generator.post(route, {"text": "hello"})) == NOT_EMBEDDING, route
    r = generator.post("/v1/embeddings", {"model": "m", "input": "hello"})
    assert r.status_code == 400 and r.json()["message"] == NOT_EMBEDDING, r.text
    assert generator.post("/generate", {"input_ids": [101], "sampling_params": {"max_new_tokens": 1}}).ok


@pytest.mark.parametrize("which", ["qwen2_embed", "minilm", "reward"])
def test_generate_on_an_embedding_model(which: str, request: pytest.FixtureRequest) -> None:
    server: ServerProcess = request.getfixturevalue(which)
    message = _error(server.post("/generate", {"text": "hello", "sampling_params": {"max_new_tokens": 2}}))
    assert "embedding model" in message and "/encode" in message, message
    chat = server.post(
        "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat.status_code == 400 and "/v1/chat/completions is not served" in chat.json()["message"], (
        chat.text
    )
    assert server.get("/health").status_code == 200


def test_model_info_of_embedding_servers(minilm: ServerProcess, reward: ServerProcess) -> None:
    for server, name in ((minilm, spec.MINILM), (reward, spec.TINY_LLAMA_REWARD)):
        info = server.get("/get_model_info").json()
        assert info == {
            "model_path": str(fixture_path(name)),
            "tokenizer_path": str(fixture_path(name)),
            "is_generation": False,
        }, info
    # /encode and /classify take the whole context: the advertised longest input is all of it
    assert minilm.get("/get_server_info").json()["max_req_input_len"] == 512
    assert minilm.post("/encode", {"input_ids": [101] + [2000] * 510 + [102]}).status_code == 200
    assert minilm.post("/encode", {"input_ids": [101] + [2000] * 511 + [102]}).status_code == 400


def test_a_kv_bound_reward_model_advertises_the_longest_input_it_takes() -> None:
    """With a KV cache smaller than the context, the longest input is one less than the cache
    holds (every input keeps a slot free), and the advertised figure is that one."""
    from runtime.engine import Engine

    engine = Engine(model_path=str(fixture_path(spec.TINY_LLAMA_REWARD)), max_total_tokens=64)
    try:
        longest = engine.get_server_info()["max_req_input_len"]
        assert longest == 63
        assert len(engine.encode(input_ids=[5] * longest)["embedding"]) == 1
        with pytest.raises(ValueError, match="does not fit the KV cache"):
            engine.encode(input_ids=[5] * (longest + 1))
    finally:
        engine.shutdown()
