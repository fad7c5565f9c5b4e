"""The server's pieces that need no model: the stop-string scanner, the model runner's queue (back-pressure,
cancellation, timeouts) and how OpenAI chat messages become one image, the turns and the question."""

from __future__ import annotations

import threading
import time
from typing import Iterator

import pytest


def test_stop_scanner_cuts_at_the_first_stop_across_pieces():
    from facellm_edge.serve.answering import StopScanner

    scanner = StopScanner(("\n\n", "END"))
    out = [scanner.feed(p) for p in ("Thirty", " years\n", "\nmore", " text")]
    assert out == ["Thirty", " years", "", ""] and scanner.hit  # "\n" held back until it proved to be a stop
    scanner = StopScanner(("END",))
    assert [scanner.feed(p) for p in ("a E", "N", "x")] == ["a ", "", "ENx"] and not scanner.hit
    assert scanner.feed("EN") == "" and scanner.flush() == "EN"  # the stream ended: what was held is text


def test_runner_bounds_the_queue_cancels_abandoned_streams_and_times_out():
    import asyncio

    from facellm_edge.serve.errors import APIError, Busy
    from facellm_edge.serve.runner import ModelRunner

    produced: list[int] = []
    gate = threading.Event()

    def slow(n: int) -> Iterator[int]:
        for i in range(n):
            gate.wait(5)
            produced.append(i)
            yield i
            time.sleep(0.01)
        return "done"

    async def main() -> None:
        runner = ModelRunner(max_queue=1, timeout_s=5.0)
        first = runner.stream(slow, 1000)
        second = runner.stream(slow, 2)  # waits behind the first
        with pytest.raises(Busy) as busy:
            runner.stream(slow, 2)
        assert busy.value.status == 503 and int(busy.value.headers["Retry-After"]) >= 1
        assert runner.busy == 2 and runner.depth == 1
        gate.set()
        assert [await first.__anext__() for _ in range(3)] == [0, 1, 2]
        await first.aclose()  # the client went away: the worker stops at its next item
        assert [x async for x in second] == [0, 1] and second.result == "done"
        assert len(produced) < 20 and runner.busy == 0
        assert await runner.call(sum, [1, 2]) == 3

        gate.clear()
        impatient = ModelRunner(max_queue=1, timeout_s=0.3)
        running, waiting = impatient.stream(slow, 1), impatient.stream(slow, 1)
        with pytest.raises(APIError) as late:
            await running.__anext__()
        with pytest.raises(Busy):
            await waiting.__anext__()  # never started: 503, dropped from the queue
        assert late.value.status == 504
        gate.set()
        impatient.close()
        runner.close()
        assert impatient.busy == 0

    asyncio.run(main())


def test_a_stream_ends_once_the_model_is_free():
    """The end of a stream (and an error) reaches the client only after the worker closed the iterator (the model's
    generation freed) and let the request go: a client that asks again at once is not refused as busy."""
    import asyncio

    from facellm_edge.serve.runner import ModelRunner

    class SlowToClose:  # an answer whose close() (the generation's cleanup) takes a while
        def __init__(self) -> None:
            self.closed, self.n = threading.Event(), 0

        def __iter__(self):
            return self

        def __next__(self) -> int:
            if self.n:
                raise StopIteration("done")
            self.n += 1
            return 1

        def close(self) -> None:
            time.sleep(0.3)
            self.closed.set()

    async def main() -> None:
        runner = ModelRunner(max_queue=0, timeout_s=5.0)
        answer = SlowToClose()
        stream = runner.stream(lambda: answer)
        assert [x async for x in stream] == [1] and stream.result == "done"
        assert answer.closed.is_set() and runner.busy == 0
        again = SlowToClose()
        assert [x async for x in runner.stream(lambda: again)] == [1]  # admitted: max_queue 0, nothing running
        runner.close()

    asyncio.run(main())


def test_chat_messages_make_one_image_the_turns_and_the_question(astronaut_bgr, png, data_url):
    from facellm_edge.serve.errors import APIError
    from facellm_edge.serve.openai_schema import ChatRequest, conversation

    url = data_url(astronaut_bgr)
    image = {"type": "image_url", "image_url": {"url": url}}
    req = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [image]}, {"role": "user", "content": "How old?"},  # merged into one turn
        {"role": "assistant", "content": "Thirty."},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "the mood?"}, image]}]})
    conv = conversation(req)
    assert conv.turns == (("How old?", "Thirty."),) and conv.question == "And\nthe mood?"
    assert conv.image.sha256 == __import__("hashlib").sha256(png(astronaut_bgr)).hexdigest()
    with pytest.raises(APIError, match="start and end with a user message"):
        conversation(ChatRequest.model_validate({"model": "m", "messages": [
            {"role": "assistant", "content": "Hi"}, {"role": "user", "content": [image]}]}))
