import os


from tsched.data import tasks
from tsched.data.tokenizer import EOS_ID, PAD_ID, Tokenizer, load_or_train, train_tokenizer


def corpus(n=300):
    train, _ = tasks.make_splits(list(tasks.FAMILIES), 1, 4, n, 10, seed=0)
    return [t for p in train for t in (p.problem, p.solution)]


def test_round_trip_and_digit_splitting(tmp_path):
    texts = corpus()
    tok = train_tokenizer(texts, str(tmp_path / "tok.model"), vocab_size=64)
    assert tok.pad_id == PAD_ID and tok.eos_id == EOS_ID
    for t in texts[:200]:
        assert tok.decode(tok.encode(t)) == t
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("Compute 1234+567.")]
    assert all(len(p.strip("▁")) <= 1 for p in pieces if any(c.isdigit() for c in p))
    # decode stops at eos and drops padding
    ids = tok.encode("Answer: 42")
    assert tok.decode([PAD_ID] + ids + [EOS_ID] + tok.encode("junk")) == "Answer: 42"


def test_cached_model_is_reused_and_any_model_path_loads(tmp_path):
    path = str(tmp_path / "cache" / "tok.model")
    a = load_or_train("", path, corpus(100), 64)
    mtime = os.path.getmtime(path)
    b = load_or_train("", path, iter(["never read"]), 64)  # cached: not retrained
    assert os.path.getmtime(path) == mtime and b.vocab_size == a.vocab_size
    c = load_or_train(path, str(tmp_path / "unused.model"), [], 64)
    assert isinstance(c, Tokenizer) and not os.path.exists(tmp_path / "unused.model")
    assert c.encode("gcd(12,8)") == a.encode("gcd(12,8)")


def test_hf_tokenizer_json_behind_the_same_interface(tmp_path):
    import json

    from tokenizers import Tokenizer as HF, models, pre_tokenizers, trainers, decoders

    from tsched.data.tokenizer import load

    hf = HF(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(corpus(100), trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<|eos|>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eos|>", "pad_token": "<pad>"}))
    tok = load(str(tmp_path / "tokenizer.json"))
    assert tok.eos_id == 2 and tok.pad_id == 0 and tok.vocab_size <= 300
    for t in corpus(20):
        assert tok.decode(tok.encode(t)) == t
    assert tok.decode([0] + tok.encode("gcd(4,6)") + [2] + tok.encode("junk")) == "gcd(4,6)"


def test_runs_training_the_same_cached_model_at_once_all_get_it(tmp_path):
    """A sweep's parallel runs on one data_dir may all miss the cache and train it together."""
    import threading

    path, texts, barrier, errors = str(tmp_path / "tok.model"), corpus(100), threading.Barrier(4), []

    def train():
        barrier.wait()
        try:
            train_tokenizer(texts, path, 64)
        except Exception as e:  # noqa: BLE001 - the assertion below shows it
            errors.append(repr(e))

    threads = [threading.Thread(target=train) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert os.listdir(tmp_path) == ["tok.model"]  # no temporary file left behind
    assert Tokenizer(path).decode(Tokenizer(path).encode("gcd(12,8)")) == "gcd(12,8)"
