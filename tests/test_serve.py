"""`python -m alpacare_jax.serve` as a real process on 127.0.0.1, answering the official `openai` client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from alpacare_jax.data.prompts import format_prompt
from alpacare_jax.data.tokenizer import load_tokenizer
from alpacare_jax.serve import API_KEY_ENV, RequestError, apply_stop, chat_instruction
from tests.inference_fixtures import GROUP, MODEL_NAME, REPO_ROOT, prepared, subprocess_env, trained  # noqa: F401

INSTRUCTION = "What are the common symptoms of iron deficiency anemia?"
API_KEY = "sk-serve-test-4242"


@pytest.fixture(scope="module")
def server(trained):  # noqa: F811
    """The served HF export: (base_url, tokenizer); the process is killed after the module."""
    proc = subprocess.Popen([sys.executable, "-m", "alpacare_jax.serve", f"--model={trained / 'hf'}",
                             f"--name={MODEL_NAME}", "--port=0", "--max_tokens=24"],
                            env={**subprocess_env(1), API_KEY_ENV: API_KEY}, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()  # printed once the model is loaded, compiled and the port bound
        if not line.startswith("serving"):
            proc.kill()
            raise AssertionError(f"serve did not start: {line}\n{proc.stderr.read()[-3000:]}")
        yield line.split(" at ")[1].strip(), load_tokenizer(trained / "hf")
    finally:
        proc.kill()
        proc.wait(timeout=30)
        assert API_KEY not in proc.stdout.read() + proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()


@GROUP
@pytest.mark.slow
def test_openai_client_chat_and_completions(server):
    base_url, tokenizer = server
    client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]

    chat = client.chat.completions.create(
        model=MODEL_NAME, max_tokens=12,
        messages=[{"role": "system", "content": "Ignored."}, {"role": "user", "content": INSTRUCTION}])
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # two training steps: the model has not learned to stop
    prompt_tokens = len(tokenizer.encode(format_prompt(INSTRUCTION), bos=True))
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens) == (
        prompt_tokens, 12, prompt_tokens + 12)

    # /v1/completions continues the text as given: the chat prompt sent raw gives the chat answer.
    text = client.completions.create(model=MODEL_NAME, prompt=format_prompt(INSTRUCTION), max_tokens=12)
    assert text.choices[0].text.strip() == choice.message.content
    assert text.usage.prompt_tokens == prompt_tokens and text.usage.completion_tokens == 12

    raw = text.choices[0].text
    stop = raw[len(raw) // 2:len(raw) // 2 + 2]
    cut = client.completions.create(model=MODEL_NAME, prompt=format_prompt(INSTRUCTION), max_tokens=12, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == raw[: raw.find(stop)]

    # Concurrent requests are decoded in batches and get what each would get alone.
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: client.chat.completions.create(
            model=MODEL_NAME, max_tokens=12, messages=[{"role": "user", "content": INSTRUCTION}]
        ).choices[0].message.content, range(4)))
    assert answers == [choice.message.content] * 4

    sampled = client.chat.completions.create(model=MODEL_NAME, max_tokens=8, temperature=1.0, top_p=0.9, seed=3,
                                             messages=[{"role": "user", "content": INSTRUCTION}])
    assert sampled.usage.completion_tokens <= 8


@GROUP
@pytest.mark.slow
def test_bad_requests_get_openai_errors(server):
    base_url, _ = server
    client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=60)
    user = [{"role": "user", "content": INSTRUCTION}]
    with pytest.raises(openai.NotFoundError, match="serves 'demo'"):
        client.chat.completions.create(model="gpt-4", messages=user)
    with pytest.raises(openai.BadRequestError, match="context of 256"):
        client.chat.completions.create(model=MODEL_NAME, messages=user, max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model=MODEL_NAME, messages=user, n=2)
    with pytest.raises(openai.BadRequestError, match="single user message"):
        client.chat.completions.create(model=MODEL_NAME, messages=[*user, {"role": "assistant", "content": "x"}, *user])


@GROUP
@pytest.mark.slow
def test_streaming_gives_the_same_answer_as_one_response(server):
    base_url, _ = server
    client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120)
    user = [{"role": "user", "content": INSTRUCTION}]
    whole = client.chat.completions.create(model=MODEL_NAME, max_tokens=12, messages=user)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, max_tokens=12, messages=user, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12

    prompt = format_prompt(INSTRUCTION)
    text = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12).choices[0].text
    streamed = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text
    assert streamed[-1].choices[0].finish_reason == "length" and streamed[-1].usage is None


@GROUP
@pytest.mark.slow
def test_api_key_is_required_when_set(server):
    base_url, _ = server
    client = openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        client.models.list()
    with pytest.raises(openai.AuthenticationError, match="API key"):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": INSTRUCTION}])
    request = urllib.request.Request(base_url + "/models")  # no Authorization header at all
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401 and json.load(refused.value)["error"]["code"] == "invalid_api_key"
    health = urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=30)
    assert json.load(health) == {"status": "ok"}  # for load balancers: no key needed


def test_chat_mapping_and_stop():
    assert chat_instruction([{"role": "system", "content": "s"},
                             {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) == "ab"
    for bad in ([], [{"role": "assistant", "content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(RequestError):
            chat_instruction(bad)
    assert apply_stop("one two three", ["three", "two"]) == ("one ", True)
    assert apply_stop("one", ["x"]) == ("one", False)
