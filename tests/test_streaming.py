"""Token streaming (:mod:`mmformer.generation.streaming`): pieces arrive while a small random LM decodes, concatenate
to exactly
the text ``complete`` returns (greedy, sampling, with a stop string), leave the ids unchanged, never split a UTF-8
character, and a cancelled stream stops its generation; beams and several rows are refused."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from mmformer.generation.completion import complete
from mmformer.generation.decoding import generate
from mmformer.generation.streaming import StreamCancelled, TextIteratorStreamer, TextStreamer
from mmformer.preprocess.processor import Processor
from mmformer.preprocess.tokenizer import Tokenizer
from tests import test_longform_whisper
from tests.test_text_generation import language_model, sentencepiece_tokenizer

TEXTS = ["the cat sat on the mat.", "a dog ran in the park!", "once upon a time there was a king.\n",
         "naïve café, 日本語 über straße"] * 4  # fmt: skip


class Recorder(TextStreamer):
    """Each piece with the number of tokens received when it was sent."""

    def __init__(self, tokenizer, **kw):
        super().__init__(tokenizer, **kw)
        self.pieces: list[tuple[str, int]] = []
        self.steps, self.ended = 0, False

    def put(self, value):
        self.steps += 1
        super().put(value)

    def on_text(self, text, stream_end=False):
        if text:
            self.pieces.append((text, self.steps))
        self.ended |= stream_end

    @property
    def text(self) -> str:
        return "".join(p for p, _ in self.pieces)


@pytest.fixture(scope="module")
def lm():
    tokenizer = Tokenizer.train(TEXTS, vocab_size=300, max_length=48)
    torch.manual_seed(0)
    model = language_model("rope-gqa", vocab_size=tokenizer.vocab_size)
    model.processor = Processor(tokenizer)
    return model, tokenizer


@pytest.mark.parametrize(
    "decoding",
    [{"do_sample": False}, {"do_sample": True, "temperature": 1.5, "top_k": 50}, {"cache": "static"}],
    ids=["greedy", "sampling", "static-cache"],
)
def test_streamed_pieces_are_the_completion_and_arrive_while_decoding(lm, decoding):
    model, tokenizer = lm
    for prompt in ["the cat", "once upon a time", "a dog"]:
        seed = {"generator": torch.Generator().manual_seed(7)} if decoding.get("do_sample") else {}
        expected = complete(model, prompt, max_new_tokens=20, **decoding, **seed)[0]
        streamer = Recorder(tokenizer)
        seed = {"generator": torch.Generator().manual_seed(7)} if decoding.get("do_sample") else {}
        got = complete(model, prompt, max_new_tokens=20, streamer=streamer, **decoding, **seed)[0]
        assert got == expected and streamer.text == expected and streamer.ended, (prompt, streamer.pieces)
        assert len(streamer.pieces) > 1, streamer.pieces  # several pieces ...
        assert streamer.pieces[0][1] < streamer.steps  # ... the first one sent before the last token came


def test_the_streamer_leaves_the_ids_unchanged(lm):
    model, tokenizer = lm
    prompt = [tokenizer.encode("the cat")[:-1]] if tokenizer.encode("the cat")[-1] == tokenizer.eos_id else None
    prompt = prompt or [tokenizer.encode("the cat")]
    plain = generate(model, prompt_ids=prompt, max_new_tokens=15)
    streamer = Recorder(tokenizer)
    streamed = generate(model, prompt_ids=prompt, max_new_tokens=15, streamer=streamer)
    assert torch.equal(plain, streamed)
    assert streamer.steps == 1 + streamed.shape[1] - len(prompt[0])  # the prompt, then one put per token
    assert streamer.text == tokenizer.decode(streamed[0, len(prompt[0]) :])


def test_a_stop_string_ends_the_stream_where_complete_cuts(lm):
    model, tokenizer = lm
    for prompt in ["the cat", "once upon a time", "a dog"]:
        plain = complete(model, prompt, max_new_tokens=20)[0]
        stops = [plain[3:5]] if len(plain.strip()) > 5 else ["e"]  # a string the continuation really produces
        expected = complete(model, prompt, max_new_tokens=20, stop_strings=stops)[0]
        streamer = Recorder(tokenizer)
        got = complete(model, prompt, max_new_tokens=20, stop_strings=stops, streamer=streamer)[0]
        assert got == expected == streamer.text, (prompt, stops, streamer.pieces)
        assert not any(s in streamer.text for s in stops)


def test_a_sentencepiece_stream_keeps_the_leading_space_complete_returns():
    """A Llama tokenizer's decoder strips the space of a text's first piece: the stream decodes its tokens after the
    prompt's, as ``complete`` does, so its first piece keeps the space ("who lived in" + " there", not "there")."""
    from mmformer.config import GenerationConfig

    tokenizer = sentencepiece_tokenizer()
    model = language_model("rope-gqa", vocab_size=tokenizer.vocab_size)
    model.processor = Processor(tokenizer)
    unspaced = [i for piece, i in tokenizer.backend.get_vocab().items() if not piece.startswith("▁")]
    model.config.generation = GenerationConfig(begin_suppress_tokens=unspaced)  # a "▁" piece comes first
    for prompt in ["who lived in", "once upon"]:
        expected = complete(model, prompt, max_new_tokens=8)[0]
        streamer = Recorder(tokenizer)
        assert complete(model, prompt, max_new_tokens=8, streamer=streamer)[0] == expected
        assert streamer.text == expected and expected.startswith(" "), (prompt, streamer.pieces)


def test_multibyte_characters_and_stop_prefixes_are_held_back_until_stable():
    tokenizer = Tokenizer.train(TEXTS[:3], vocab_size=280, max_length=48)  # few merges: "日" is 3 byte tokens
    text = "naïve café, 日本語 über"
    ids = tokenizer.encode(text)
    ids = ids[:-1] if ids[-1] == tokenizer.eos_id else ids
    streamer = Recorder(tokenizer)
    streamer.put(torch.tensor([[1]]))  # the prompt, skipped
    held = 0
    for n, i in enumerate(ids, 1):
        before = len(streamer.pieces)
        streamer.put(torch.tensor([i]))
        held += len(streamer.pieces) == before and tokenizer.decode(ids[:n]).endswith("\ufffd")
    streamer.end()
    assert held > 0  # some steps ended inside a character and sent nothing
    assert streamer.text == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p, _ in streamer.pieces)

    streamer = Recorder(tokenizer)
    streamer.set_stop_strings(["ca"])
    streamer.put(torch.tensor([1]))
    for i in tokenizer.encode("naïve c")[:-1]:
        streamer.put(torch.tensor([i]))
    assert streamer.text == "naïve "  # "c" may still become "ca"
    for i in tokenizer.encode("afé")[:-1]:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert streamer.text == "naïve "


def test_iterator_streamer_in_a_thread_and_cancel_stops_the_generation(lm):
    model, tokenizer = lm
    expected = complete(model, "the cat", max_new_tokens=20)[0]
    streamer = TextIteratorStreamer(tokenizer, timeout=60)
    thread = threading.Thread(target=complete, args=(model, "the cat"), kwargs={"max_new_tokens": 20,
                                                                                 "streamer": streamer})  # fmt: skip
    thread.start()
    assert "".join(streamer) == expected
    thread.join()

    class Cancelling(Recorder):
        def on_text(self, text, stream_end=False):
            super().on_text(text, stream_end)
            if len(self.pieces) == 2:
                self.cancel()  # as the server does when its client goes away

    streamer = Cancelling(tokenizer)
    with pytest.raises(StreamCancelled):
        complete(model, "the cat", max_new_tokens=20, streamer=streamer)
    assert len(streamer.pieces) == 2 and not streamer.ended


def test_beams_and_several_rows_are_refused(lm):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="num_beams=3"):
        complete(model, "the cat", num_beams=3, streamer=TextStreamer(tokenizer))
    with pytest.raises(ValueError, match="2 rows"):
        complete(model, ["the cat", "a dog"], streamer=TextStreamer(tokenizer))
    with pytest.raises(ValueError, match="one row"):
        TextStreamer(tokenizer).put(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="tokenizer"):
        TextStreamer(object())


# ---------------------------------------------------------------------------------------------- long-form segments
DIGITS = Path(__file__).resolve().parent.parent / "data" / "digits"


def long_recording(model, n_clips: int = 24) -> torch.Tensor:
    """(S,) the first ``n_clips`` test recordings of the digits set, each followed by half a second of silence:
    longer than the model's window, so the long-form path cuts it into several windows."""
    rows = [json.loads(line) for line in (DIGITS / "test.jsonl").read_text().splitlines()][:n_clips]
    rate = model.config.audio.sample_rate
    pause = torch.zeros(rate // 2)
    clips = [model.processor.load_audio(str(DIGITS / r["audio_filepath"])) for r in rows]
    wave = torch.cat([x for clip in clips for x in (clip, pause)])
    window = model.config.audio.window_samples or model.config.audio.max_frames * model.config.audio.hop_length
    assert wave.shape[0] > window
    return wave


def test_long_form_segments_are_handed_on_in_order_while_the_rest_is_decoded():
    import mmformer
    from mmformer.generation.options import DecodingOptions
    from mmformer.longform import transcribe_files

    model = mmformer.load_pretrained(str(DIGITS.parent / "digits_model"))
    wave = long_recording(model)
    (expected,) = transcribe_files(model, [wave], DecodingOptions(do_sample=False))
    handed, progress = [], []
    (result,) = transcribe_files(
        model,
        [wave],
        DecodingOptions(do_sample=False),
        batch_size=1,
        progress=lambda seconds, total: progress.append(seconds),
        on_segment=lambda index, segment: handed.append((index, len(progress), segment)),
    )
    assert result == expected  # the timeline order of the queue changes nothing
    assert [s for _, _, s in handed] == result["segments"] and len(handed) > 1
    assert {i for i, _, _ in handed} == {0}
    assert handed[0][1] < len(progress)  # the first segment came before the last window was decoded
    assert [n for _, n, _ in handed] == sorted(n for _, n, _ in handed)


models, speech = test_longform_whisper.models, test_longform_whisper.speech  # its fixtures, used here too


def test_whisper_sequential_hands_each_window_s_segments_on_as_it_is_decoded(models, speech):
    """openai-whisper's algorithm (a converted random checkpoint, 60 s of speech): ``transcribe_files`` hands the
    segments on window by window, the same ones it returns."""
    from mmformer.longform import TranscribeOptions, transcribe_files

    _, model = models
    seen, handed = [], []
    (result,) = transcribe_files(
        model,
        [speech],
        TranscribeOptions(temperature=0.0),
        progress=lambda seconds, total: seen.append(seconds),
        on_segment=lambda index, segment: handed.append((index, len(seen), segment)),
    )
    assert [s for _, _, s in handed] == result["segments"] and len(handed) > 1
    assert {i for i, _, _ in handed} == {0}
    assert handed[0][1] < len(seen) - 1  # the first window's segments came before the later windows were decoded
