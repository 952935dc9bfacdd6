"""Raw text input: .txt / .tsv sentences tokenised with a tokenizer.json (the tokenizers library)."""

from __future__ import annotations

import numpy as np
import pytest

import onnxprune
from onnxprune.api import as_samples
from onnxprune.data.text import open_text, read_text
from onnxprune.errors import DataError
from onnxprune.pipeline import Recipe
from tests.graphs import token_ffn

tokenizers = pytest.importorskip("tokenizers")

WORDS = ["good", "bad", "movie", "film", "great", "awful", "plot", "the", "a", "was", "is", "not"]


def build_tokenizer(path):
    """A BERT-like WordPiece tokenizer of WORDS saved at ``path``: lower case, [CLS] text [SEP], [PAD] = 0."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path))
    return path


@pytest.fixture
def tokenizer(tmp_path):
    return build_tokenizer(tmp_path / "tokenizer.json")


def _tsv(tmp_path, n: int = 40):
    rng = np.random.default_rng(0)
    lines = ["label\tlabel_name\ttext"]
    for i in range(n):
        words = rng.choice(WORDS, size=rng.integers(2, 7))
        lines.append(f"{i % 2}\t{'pos' if i % 2 else 'neg'}\t{' '.join(words).capitalize()}")
    path = tmp_path / "reviews.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_tsv_sentences_become_padded_token_arrays_with_labels(tmp_path, tokenizer):
    model = token_ffn(vocab=16)
    arrays = open_text(_tsv(tmp_path), model, tokenizer=tokenizer, max_length=8)
    assert set(arrays) == {"input_ids", "attention_mask", "y"}
    assert arrays["input_ids"].shape == (40, 8) and arrays["input_ids"].dtype == np.int64
    assert (arrays["input_ids"][:, 0] == 2).all()                   # [CLS]
    lengths = arrays["attention_mask"].sum(axis=1)
    assert (arrays["input_ids"][np.arange(40), lengths - 1] == 3).all()   # [SEP] ends every sentence
    assert (arrays["input_ids"][arrays["attention_mask"] == 0] == 0).all()  # [PAD]
    np.testing.assert_array_equal(arrays["y"], np.arange(40) % 2)


def test_long_sentences_are_cut_to_max_length(tmp_path, tokenizer):
    path = tmp_path / "one.txt"
    path.write_text(" ".join(WORDS * 3) + "\n\nthe film\n")
    arrays = open_text(path, token_ffn(vocab=16), tokenizer=tokenizer, max_length=6)
    assert arrays["input_ids"].shape == (2, 6) and "y" not in arrays
    assert arrays["attention_mask"][0].sum() == 6 and arrays["attention_mask"][1].sum() == 4


def test_compress_and_validate_from_text(tmp_path, tokenizer):
    model = token_ffn(vocab=16)
    data = _tsv(tmp_path, n=60)
    recipe = Recipe(passes=(("select-nodes", {"criterion": "spectral", "counts": {"ffn1": 8}}),
                            ("reconstruct-next-layer", {})), calib_size=None,
                    preprocess={"tokenizer": str(tokenizer), "max_length": 8}, metric="embedding")
    result = onnxprune.compress(model, data, recipe=recipe, measure_latency=False, progress=False)
    e = result.report["validation"]["embedding"]
    assert e["samples"] == 30 and "knn_reference" in e
    samples = as_samples(data, model, {"tokenizer": str(tokenizer), "max_length": 8})
    assert len(samples) == 60 and samples.labels is not None


def test_text_files_need_a_tokenizer_and_a_text_column(tmp_path, tokenizer):
    model = token_ffn(vocab=16)
    with pytest.raises(DataError, match="--tokenizer"):
        as_samples(_tsv(tmp_path), model, {})
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\tsentence_text\n0\thello\n")
    with pytest.raises(DataError, match="no 'text' column"):
        read_text(bad)
    with pytest.raises(DataError, match="tokenizer"):
        open_text(_tsv(tmp_path), model, tokenizer=tmp_path / "missing.json")
    with pytest.raises(DataError, match="do not give|does not give|not give"):
        open_text(_tsv(tmp_path), token_ffn(), tokenizer=tokenizer)   # the model takes float features x


def test_cli_validate_and_inspect_a_token_model(tmp_path, tokenizer):
    import onnx
    from click.testing import CliRunner

    from onnxprune.cli import main

    path = tmp_path / "model.onnx"
    onnx.save(token_ffn(vocab=16), path)
    data = _tsv(tmp_path, n=30)
    result = CliRunner().invoke(main, ["validate", str(path), str(path), "--data", str(data), "--tokenizer",
                                       str(tokenizer), "--max-length", "8", "--metric", "embedding", "--no-latency"])
    assert result.exit_code == 0, result.output
    assert "cosine       1.0000" in result.output and "kNN" in result.output
    result = CliRunner().invoke(main, ["validate", str(path), str(path), "--data", str(data), "--no-latency"])
    assert result.exit_code == 1 and "--tokenizer" in result.output
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert "16 units (last axis)  prunable" in result.output
    # token arrays are fed as they are: a --tokenizer that could not run is a usage error, not a recipe entry
    arrays = tmp_path / "tokens.npz"
    np.savez(arrays, **as_samples(data, token_ffn(vocab=16), {"tokenizer": str(tokenizer), "max_length": 8}).batch(
        np.arange(30)))
    result = CliRunner().invoke(main, ["validate", str(path), str(path), "--data", str(arrays), "--tokenizer",
                                       str(tokenizer), "--no-latency"])
    assert result.exit_code == 2 and "--tokenizer does not apply: none of the data is text" in result.output


def test_a_byte_order_mark_is_not_part_of_the_header(tmp_path):
    for header, row in (("label\ttext", "1\tgood movie"), ("text\tlabel", "good movie\t1")):
        path = tmp_path / "bom.tsv"
        path.write_bytes(("\ufeff" + header + "\n" + row + "\n").encode("utf-8"))
        sentences, labels = read_text(path)
        assert sentences == ["good movie"] and labels.tolist() == [1]
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffgood movie\n".encode("utf-8"))
    assert read_text(path) == (["good movie"], None)


def test_lines_break_at_newlines_only(tmp_path):
    """U+2028, U+0085, \\x0b, \\x0c and \\x1c-\\x1e are line breaks to str.splitlines, not to a text file."""
    odd = "\u2028\x85\x0b\x0c\x1c\x1d\x1e"
    path = tmp_path / "odd.txt"
    path.write_bytes(f"good{odd}movie\r\nbad film\n".encode("utf-8"))
    sentences, _ = read_text(path)
    assert sentences == [f"good{odd}movie", "bad film"]
    path = tmp_path / "odd.tsv"
    path.write_bytes(f"label\ttext\r\n1\tgood{odd}movie\r\n0\tbad film\r\n".encode("utf-8"))
    sentences, labels = read_text(path)
    assert sentences == [f"good{odd}movie", "bad film"] and labels.tolist() == [1, 0]


def test_a_row_with_more_or_fewer_columns_than_the_header_is_refused_with_its_line(tmp_path):
    path = tmp_path / "tab.tsv"
    path.write_text("label\ttext\n0\tbad\n1\tgreat film\tand actors\n")
    with pytest.raises(DataError, match=r"tab.tsv \| line 3 has 3 columns, the header 2\. Hint: .*tab"):
        read_text(path)
    path.write_text("label\tlabel_name\ttext\n0\tneg\tbad\n1\tgreat film\n")
    with pytest.raises(DataError, match="line 3 has 2 columns, the header 3"):
        read_text(path)


def test_a_recipe_keeps_the_tokenizer_path_absolute_for_runs_from_other_folders(tmp_path, tokenizer, monkeypatch):
    import json

    import onnx
    from click.testing import CliRunner

    from onnxprune.cli import main

    first, other = tmp_path / "first", tmp_path / "other"
    first.mkdir()
    other.mkdir()
    onnx.save(token_ffn(vocab=16), tmp_path / "model.onnx")
    data = _tsv(tmp_path, n=40)
    (first / "tok.json").write_bytes(tokenizer.read_bytes())
    monkeypatch.chdir(first)
    args = ["--target-data", str(data), "--metric", "embedding", "--no-latency", "-q"]
    result = CliRunner().invoke(main, ["compress", str(tmp_path / "model.onnx"), *args, "--method", "dalr-bc",
                                       "--rank", "4", "--tokenizer", "tok.json", "--max-length", "8",
                                       "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out.recipe.json").read_text())["preprocess"]
    assert saved["tokenizer"] == str(first / "tok.json")
    monkeypatch.chdir(other)
    result = CliRunner().invoke(main, ["compress", str(tmp_path / "model.onnx"), *args,
                                       "--recipe", str(tmp_path / "out.recipe.json"), "-o", str(tmp_path / "again.onnx")])
    assert result.exit_code == 0, result.output


def test_max_length_beyond_the_positions_or_huge_is_refused_before_tokenising(tmp_path, tokenizer):
    """--max-length past the position table was only caught after the tokenizer had padded every row
    to it: 1e11 aborted the process in the tokenizers library, 1e23 was an internal error (exit 4)."""
    import onnx
    from click.testing import CliRunner

    from onnxprune.cli import main
    from tests.data.test_tokens import positional

    model = positional(6)
    path = tmp_path / "one.txt"
    path.write_text("good movie\n")
    assert open_text(path, model, tokenizer=tokenizer, max_length=6)["input_ids"].shape == (1, 6)
    with pytest.raises(DataError, match=r"--max-length \| 7 tokens is more than the model's 6 positions.*"
                                        r"--max-length 6 or less"):
        open_text(path, model, tokenizer=tokenizer, max_length=7)
    with pytest.raises(DataError, match="more than onnxprune pads a sentence to"):
        open_text(path, token_ffn(vocab=16), tokenizer=tokenizer, max_length=10 ** 12)
    with pytest.raises(DataError, match="not a whole number"):
        open_text(path, model, tokenizer=tokenizer, max_length=6.0)
    onnx.save(model, tmp_path / "model.onnx")
    for length, code in (("10000000000", 2), ("99999999999999999999999", 2), ("7", 1)):
        result = CliRunner().invoke(main, ["validate", str(tmp_path / "model.onnx"), str(tmp_path / "model.onnx"),
                                           "--data", str(path), "--tokenizer", str(tokenizer),
                                           "--max-length", length, "--no-latency"])
        assert result.exit_code == code and "--max-length" in result.output, (length, result.output)


def test_an_unknown_data_suffix_names_the_text_formats(tmp_path, tokenizer):
    path = tmp_path / "reviews.csv"
    path.write_text("label,text\n1,good movie\n")
    with pytest.raises(DataError, match=r"unknown file type '.csv'.*\.txt .*\.tsv"):
        as_samples(path, token_ffn(vocab=16), {"tokenizer": str(tokenizer)})
