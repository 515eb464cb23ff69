from dataclasses import replace

import pytest
import torch

from conftest import make_batch, omni_config
from omniforge.model.generate import GenerationConfig, contrasted, generate, sample, stop_token_ids, stream
from omniforge.model.omni import OmniModel
from omniforge.model.tokenizer import CHATML_TEMPLATE

PROMPTS = [
    {"text": "Describe <image>", "images": [(32, 32)]},
    {"text": "What is said? <audio> And here? <audio>", "audios": [8_000, 50_000]},
    {"text": "Hello there, how are you today?"},
]


def inputs(model, prompts=PROMPTS):
    batch = make_batch(model, prompts, padding_side="left", generation=True)
    batch.pop("labels")
    return batch


def run(model, batch, **config):
    return generate(model, config=GenerationConfig(**config), **batch)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_p": 0.8, "top_k": 40, "seed": 3}])
def test_cached_and_uncached_decoding_give_the_same_tokens(omni_model, sampling):
    batch = inputs(omni_model)
    cached = run(omni_model, batch, max_new_tokens=12, use_cache=True, **sampling)
    uncached = run(omni_model, batch, max_new_tokens=12, use_cache=False, **sampling)
    assert cached == uncached
    assert all(len(c.token_ids) == 12 or c.finish_reason == "stop" for c in cached)


def test_left_padded_batch_equals_one_sequence_at_a_time(omni_model):
    together = run(omni_model, inputs(omni_model), max_new_tokens=8)
    alone = [run(omni_model, inputs(omni_model, [p]), max_new_tokens=8)[0] for p in PROMPTS]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


def test_streamed_deltas_add_up_to_the_completion(omni_model):
    batch = inputs(omni_model)
    completions, pieces = [], [""] * 3
    steps = 0
    for deltas in stream(omni_model, config=GenerationConfig(max_new_tokens=10, temperature=1.0, seed=0),
                         completions=completions, **batch):
        steps += 1
        pieces = [p + d for p, d in zip(pieces, deltas)]
    assert steps >= 10
    assert pieces == [c.text for c in completions]
    assert [c.text for c in completions] == [omni_model.tokenizer.decode(c.token_ids, skip_special_tokens=True)
                                             for c in completions]


def test_stop_token_ends_a_sequence_and_is_not_returned(omni_model):
    batch = inputs(omni_model, PROMPTS[2:])
    free = run(omni_model, batch, max_new_tokens=8)[0]
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    stopped = run(omni_model, batch, max_new_tokens=8, stop_token_ids=[stop_at])[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:first]


def test_the_llms_own_end_of_sequence_ids_stop_a_sequence(omni_model, monkeypatch):
    batch = inputs(omni_model, PROMPTS[2:])
    free = run(omni_model, batch, max_new_tokens=8)[0]
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    monkeypatch.setattr(omni_model.llm.generation_config, "eos_token_id", [stop_at, 500])  # a list, as Qwen2.5's
    stopped = run(omni_model, batch, max_new_tokens=8)[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:first]
    end_of_turn = omni_model.tokenizer.convert_tokens_to_ids("<|im_end|>")  # also the byte-level tokenizer's eos
    assert stop_token_ids(omni_model, GenerationConfig(stop_token_ids=[7])) == sorted({end_of_turn, stop_at, 500, 7})
    monkeypatch.setattr(omni_model.llm.generation_config, "eos_token_id", stop_at)  # or one int
    assert stop_token_ids(omni_model, GenerationConfig()) == sorted({end_of_turn, stop_at})


def test_chatml_fallback_makes_its_markers_special_tokens_and_stops_at_the_end_of_a_turn(hf_parts, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # a base model's tokenizer: bytes and an end-of-text token, no chat template, no ChatML markers
    backend = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                   merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path / "base")
    config = omni_config(hf_parts, vision=None, audio=None)
    model = OmniModel.from_config(replace(config, llm=replace(config.llm, tokenizer=str(tmp_path / "base"))))
    tokenizer = model.tokenizer
    assert tokenizer.chat_template == CHATML_TEMPLATE
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer("<|im_end|>", add_special_tokens=False).input_ids == [end_of_turn]  # one token, not 10 bytes
    turn = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert tokenizer.decode(tokenizer(turn, add_special_tokens=False).input_ids, skip_special_tokens=True) == "user\nhi\n"
    assert model.llm.get_input_embeddings().num_embeddings >= len(tokenizer)
    assert stop_token_ids(model, GenerationConfig()) == sorted([tokenizer.eos_token_id, end_of_turn])


def test_right_padded_input_is_refused(omni_model):
    batch = make_batch(omni_model, [{"text": "Hi"}, PROMPTS[2]], padding_side="right", generation=True)
    with pytest.raises(ValueError, match=r"left-padded input, but attention_mask rows \[0\] end in padding: "
                                         r"collate\(\.\.\., padding_side='left'\)"):
        generate(omni_model, batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("use_cache", [True, False])
def test_one_llm_call_per_new_token_computing_the_last_positions_logits_only(omni_model, use_cache):
    batch = inputs(omni_model, PROMPTS[2:])
    logits_widths = []
    hook = omni_model.llm.register_forward_hook(lambda module, args, out: logits_widths.append(out.logits.shape[1]))
    try:
        completion = run(omni_model, batch, max_new_tokens=3, use_cache=use_cache)[0]
        assert completion.finish_reason == "length" and logits_widths == [1, 1, 1]
        assert run(omni_model, batch, max_new_tokens=0, use_cache=use_cache)[0].token_ids == []
        assert len(logits_widths) == 3  # nothing to generate: no call at all
    finally:
        hook.remove()


def test_stop_string_truncates_text_and_never_streams_it(omni_model):
    batch = inputs(omni_model, PROMPTS[2:])
    free = run(omni_model, batch, max_new_tokens=10, temperature=1.0, seed=5)[0]
    stop = free.text[4:6]
    completions, streamed = [], ""
    for deltas in stream(omni_model, config=GenerationConfig(max_new_tokens=10, temperature=1.0, seed=5, stop=[stop]),
                         completions=completions, **batch):
        streamed += deltas[0]
    assert completions[0].finish_reason == "stop"
    assert completions[0].text == free.text[: free.text.index(stop)] == streamed


def test_seeded_sampling_is_reproducible_and_differs_by_seed(omni_model):
    batch = inputs(omni_model)
    a = run(omni_model, batch, max_new_tokens=10, temperature=1.5, seed=1)
    b = run(omni_model, batch, max_new_tokens=10, temperature=1.5, seed=1)
    c = run(omni_model, batch, max_new_tokens=10, temperature=1.5, seed=2)
    assert [x.token_ids for x in a] == [x.token_ids for x in b] != [x.token_ids for x in c]


def test_top_k_1_is_greedy(omni_model):
    batch = inputs(omni_model)
    greedy = run(omni_model, batch, max_new_tokens=6)
    top1 = run(omni_model, batch, max_new_tokens=6, temperature=1.0, top_k=1, seed=0)
    assert [x.token_ids for x in greedy] == [x.token_ids for x in top1]


def test_sampler_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    none = torch.empty(1, 0, dtype=torch.long)
    rng = torch.Generator().manual_seed(0)
    picks = {int(sample(logits, none, GenerationConfig(temperature=1.0, top_k=2), rng)) for _ in range(200)}
    assert picks == {0, 1}
    # p(0)=0.64, p(1)=0.24: top_p=0.7 keeps the token that crosses 0.7, and no more
    picks = {int(sample(logits, none, GenerationConfig(temperature=1.0, top_p=0.7), rng)) for _ in range(200)}
    assert picks == {0, 1}
    picks = {int(sample(logits, none, GenerationConfig(temperature=1.0, top_p=0.5), rng)) for _ in range(50)}
    assert picks == {0}


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[0, 0, -1]])  # token 0 seen twice, then padding
    assert int(sample(logits, seen, GenerationConfig())) == 0
    assert int(sample(logits, seen, GenerationConfig(repetition_penalty=1.2))) == 1
    negative = torch.tensor([[-1.0, -1.1]])  # a negative logit is multiplied, so it drops further
    assert int(sample(negative, torch.tensor([[0]]), GenerationConfig(repetition_penalty=1.5))) == 1


def test_contrast_weighs_the_blank_picture_out_among_plausible_tokens():
    with_pictures = torch.log(torch.tensor([[0.50, 0.30, 0.15, 0.05]]))
    blank = torch.log(torch.tensor([[0.70, 0.10, 0.15, 0.05]]))
    config = GenerationConfig(contrast=1.0, plausibility=0.2)
    mixed = contrasted(with_pictures, blank, config)
    # token 3 (p 0.05 < 0.2 x 0.5) may not be picked; of the rest, the blank picture made 0 likely
    # and 1 unlikely, so the contrast picks 1: 2 log 0.3 - log 0.1 > 2 log 0.5 - log 0.7
    assert torch.isinf(mixed[0, 3]) and mixed[0, :3].isfinite().all()
    torch.testing.assert_close(mixed[0, :3], 2 * with_pictures[0, :3] - blank[0, :3])
    assert mixed.argmax().item() == 1 and with_pictures.argmax().item() == 0


def test_contrastive_decoding_decodes_against_a_blank_picture(omni_model):
    image_prompt = inputs(omni_model, PROMPTS[:1])
    with torch.no_grad():
        seen = omni_model(**image_prompt).logits[:, -1]
        blank = omni_model(**{**image_prompt, "pixel_values": torch.zeros_like(image_prompt["pixel_values"])}).logits[:, -1]
    config = {"contrast": 2.0, "plausibility": 0.01}
    first = run(omni_model, image_prompt, max_new_tokens=1, **config)[0].token_ids
    expected = contrasted(seen, blank, GenerationConfig(**config)).argmax(-1).item()
    assert first in ([expected], [])  # [] when the token picked is the end of the sequence
    batch = inputs(omni_model)  # a picture in one row: the whole batch is decoded twice, in step
    cached = run(omni_model, batch, max_new_tokens=10, use_cache=True, **config)
    assert cached == run(omni_model, batch, max_new_tokens=10, use_cache=False, **config)
    assert cached[1:] == [run(omni_model, inputs(omni_model, [p]), max_new_tokens=10)[0] for p in PROMPTS[1:]]
    no_pictures = inputs(omni_model, PROMPTS[1:])  # nothing to contrast: plain decoding
    assert run(omni_model, no_pictures, max_new_tokens=10, **config) == run(omni_model, no_pictures, max_new_tokens=10)


def scripted(monkeypatch, tokens: list[int]):
    """Make decoding pick `tokens` in order (the same for every row), whatever the logits say."""
    import omniforge.model.generate as generate_module

    picked = iter(tokens)
    monkeypatch.setattr(generate_module, "sample", lambda logits, *a: torch.full(logits.shape[:1], next(picked)))


@pytest.mark.parametrize("closed", [True, False])
def test_what_the_model_heard_is_kept_apart_from_its_answer_and_never_streamed(omni_model, monkeypatch, closed):
    tokenizer, tokens = omni_model.tokenizer, omni_model.config.tokens
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    special = lambda name: tokenizer.convert_tokens_to_ids(getattr(tokens, name))  # noqa: E731
    heard, answer = ids("what colour is it"), ids("red")
    script = [special("state_speech"), special("heard"), *heard]
    script += [special("heard_end"), *answer, tokenizer.eos_token_id] if closed else []
    scripted(monkeypatch, script)
    completions, streamed = [], ""
    for deltas in stream(omni_model, config=GenerationConfig(max_new_tokens=len(script)), completions=completions,
                         **inputs(omni_model, PROMPTS[1:2])):
        streamed += deltas[0]
    [completion] = completions
    assert completion.heard == "what colour is it"
    assert completion.text == streamed == ("red" if closed else "")  # a transcript cut short is no answer
    assert completion.token_ids == script[:-1] if closed else script  # every id, the stop token aside
    assert completion.finish_reason == ("stop" if closed else "length")


def test_an_answer_without_a_heard_span_has_none(omni_model, monkeypatch):
    tokenizer = omni_model.tokenizer
    scripted(monkeypatch, [tokenizer.convert_tokens_to_ids(omni_model.config.tokens.state_text),
                           *tokenizer("red", add_special_tokens=False).input_ids, tokenizer.eos_token_id])
    [completion] = run(omni_model, inputs(omni_model, PROMPTS[2:]), max_new_tokens=8)
    assert (completion.text, completion.heard) == ("red", None)


# --------------------------------------------------------------------------- joint CTC/attention decoding


def brute_force_prefix(log_probs: torch.Tensor, prefix: list[int], whole: bool = False) -> float:
    """log of the summed probability of every frame alignment whose collapsed labels start with
    `prefix` (or, `whole`, are exactly it); the blank is the last class."""
    import itertools

    frames, classes = log_probs.shape
    blank, total = classes - 1, []
    for path in itertools.product(range(classes), repeat=frames):
        labels = [c for i, c in enumerate(path) if c != blank and (i == 0 or c != path[i - 1])]
        if labels == prefix if whole else labels[:len(prefix)] == prefix:
            total.append(sum(log_probs[t, c] for t, c in enumerate(path)))
    return torch.stack(total).logsumexp(0).item() if total else float("-inf")


def test_ctc_prefix_scores_are_the_alignment_sums_they_stand_for():
    from omniforge.model.ctc_fusion import CTCPrefixScorer

    torch.manual_seed(0)
    log_probs = torch.randn(2, 5, 4).log_softmax(-1)  # 3 tokens + blank, 5 frames; row 1 holds 4 of them
    lengths = torch.tensor([5, 4])
    scorer = CTCPrefixScorer(log_probs, lengths)
    prefix: list[int] = []
    for token in (1, 1, 2):  # a repeat must be told apart from a held token
        steps, ending = scorer.scores()
        for row in range(2):
            frames = log_probs[row, :int(lengths[row])]
            before = brute_force_prefix(frames, prefix)
            for c in range(3):
                assert steps[row, c].item() == pytest.approx(brute_force_prefix(frames, prefix + [c]) - before, abs=1e-4)
            assert ending[row].item() == pytest.approx(brute_force_prefix(frames, prefix, whole=True) - before, abs=1e-4)
        scorer.advance(torch.tensor([token, token]), torch.tensor([True, True]))
        prefix.append(token)


@pytest.fixture
def hearing_model(hf_parts, tmp_path):
    """The test model with a CTC head that hears token 7 in every frame, whatever the audio."""
    import shutil

    from safetensors.torch import save_file

    from conftest import omni_config

    tower = shutil.copytree(hf_parts / "whisper", tmp_path / "whisper")
    config = omni_config(hf_parts)
    config.audio.path, config.audio.ctc_posteriors = str(tower), True
    classes = 41  # 40 tokens + blank
    bias = torch.zeros(classes)
    bias[7] = 50.0
    save_file({"weight": torch.zeros(classes, 32), "bias": bias}, tower / "ctc_head.safetensors")
    torch.manual_seed(0)
    return OmniModel.from_config(config).eval()


def test_last_audio_ctc_reads_each_rows_last_clip(hearing_model):
    batch = inputs(hearing_model)  # rows: an image; two clips (8 000 then 50 000 samples); text
    log_probs, lengths = hearing_model.last_audio_ctc(batch["input_ids"], batch["audio_features"],
                                                      batch["audio_valid_frames"])
    audio = hearing_model.audio
    assert lengths.tolist() == [0, audio.geometry.tokens(50_000) * audio.geometry.stack, 0]
    assert log_probs.shape[:2] == (3, lengths.max())
    assert (log_probs[1, :, 7] > -1e-3).all()  # every frame hears token 7


def test_ctc_fusion_writes_what_the_audio_says_inside_the_heard_span_only(hearing_model, monkeypatch):
    import omniforge.model.generate as generate_module

    tokenizer, tokens = hearing_model.tokenizer, hearing_model.config.tokens
    special = lambda name: tokenizer.convert_tokens_to_ids(getattr(tokens, name))  # noqa: E731
    script = [special("state_speech"), special("heard"), 7, special("heard_end"), 5, tokenizer.eos_token_id]
    batch = inputs(hearing_model, PROMPTS[1:2])
    seen_logits = {}
    for weight in (0.0, 0.9):
        steps, picked = [], iter(script)

        def record(logits, *args):
            steps.append(logits[0].clone())
            return torch.full(logits.shape[:1], next(picked))

        monkeypatch.setattr(generate_module, "sample", record)
        run(hearing_model, batch, max_new_tokens=len(script), ctc_weight=weight)
        seen_logits[weight] = steps
    plain, fused = seen_logits[0.0], seen_logits[0.9]
    for step in (0, 1, 4, 5):  # before the heard span opens and after it closes: the LLM alone
        assert torch.equal(plain[step], fused[step])
    assert fused[2].argmax().item() == 7  # the CTC hears 7 in every frame: the transcript is "7" ...
    assert fused[3].argmax().item() == special("heard_end")  # ... and nothing more (7 7 would need a blank)
    assert not torch.equal(plain[2], fused[2])


def test_ctc_fusion_leaves_the_llm_to_decide_once_the_transcript_outgrows_the_audio():
    from omniforge.model.ctc_fusion import TranscriptFusion

    torch.manual_seed(0)
    log_probs = torch.randn(1, 2, 5).log_softmax(-1)  # 2 frames hold at most 2 tokens
    heard, heard_end = 10, 11
    fusion = TranscriptFusion(log_probs, torch.tensor([2]), weight=0.5, openings=[heard], endings=[heard_end])
    logits = torch.randn(1, 12)
    assert torch.equal(fusion.adjust(logits), logits)  # nothing being transcribed yet
    fusion.update(torch.tensor([heard]), torch.tensor([False]))
    for token in (1, 2):
        fused = fusion.adjust(logits)
        assert not torch.equal(fused, logits) and not fused.isnan().any()
        fusion.update(torch.tensor([token]), torch.tensor([False]))
    assert fusion.adjust(logits).argmax().item() == heard_end  # 2 tokens fill 2 frames: only the end fits
    fusion.update(torch.tensor([3]), torch.tensor([False]))  # sampled past it all the same
    assert torch.equal(fusion.adjust(logits), logits)
    fusion.update(torch.tensor([heard_end]), torch.tensor([False]))
    assert not fusion.active.any()
