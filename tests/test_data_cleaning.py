from conftest import write_jsonl

from lorafit.data.clean import exact_key, normalize_text
from lorafit.data.decontaminate import drop_contaminated, excluded_ngrams
from lorafit.data.dedup import drop_exact_duplicates, drop_near_duplicates
from lorafit.data.documents import Document
from lorafit.data.prepare import PrepareOptions, prepare_documents
from lorafit.data.split import split_documents

ARTICLE = (
    "The garbage collector in CPython uses reference counting together with a cycle detector. "
    "Objects that are no longer reachable are freed when their reference count drops to zero, "
    "and the cycle detector periodically looks for groups of objects that only refer to each other. "
    "You can tune its thresholds with the gc module, disable it temporarily, or ask it to collect now."
)


def test_normalize_text():
    raw = "Heading\u00b6\r\n\r\n\r\n\r\nline\u00a0with nbsp   \n    indented code\u200b\n\x07"
    assert normalize_text(raw) == "Heading\n\nline with nbsp\n    indented code"
    assert normalize_text("e\u0301") == "\u00e9"  # NFC


def test_exact_duplicates_ignore_case_and_whitespace():
    docs = [Document(ARTICLE, "a"), Document(ARTICLE.upper().replace(" ", "  "), "b"), Document("other", "c")]
    kept, removed = drop_exact_duplicates(docs)
    assert [d.source for d in kept] == ["a", "c"] and removed == 1
    assert exact_key("A  b") == exact_key("a b")


def test_near_duplicates_removed_distinct_kept():
    near = ARTICLE.replace("periodically", "from time to time")
    other = "Asyncio provides an event loop, tasks and futures for concurrent code with async and await. " * 3
    kept, removed = drop_near_duplicates([Document(ARTICLE, "a"), Document(near, "b"), Document(other, "c")], 0.8)
    assert [d.source for d in kept] == ["a", "c"] and removed == 1


def test_near_duplicates_in_chinese_text_without_spaces():
    zh = (
        "垃圾回收器使用引用计数和循环检测器来管理内存。当对象的引用计数降为零时，它会被立即释放。"
        "循环检测器会定期寻找只相互引用的对象组，并将它们一起回收。你可以使用模块调整阈值，暂时禁用它，或者立即请求回收。"
        "这种设计让大多数对象能够及时释放，同时也能处理复杂的引用循环问题。"
    )
    zh_near = zh.replace("立即释放", "马上释放")
    zh_other = (
        "异步编程提供了事件循环、任务和未来对象，用于编写并发代码。协程通过等待表达式暂停执行，"
        "事件循环在等待期间运行其他任务。这种模型适合网络服务和大量输入输出操作的程序。"
    ) * 2
    docs = [Document(zh, "a"), Document(zh_near, "b"), Document(zh_other, "c")]
    kept, removed = drop_near_duplicates(docs, 0.8)
    assert [d.source for d in kept] == ["a", "c"] and removed == 1


def test_threshold_is_respected():
    half = ARTICLE[: len(ARTICLE) // 2] + " Completely different ending about sockets, ports and TLS handshakes."
    docs = [Document(ARTICLE, "a"), Document(half, "b")]
    assert drop_near_duplicates(docs, 0.8)[1] == 0
    assert drop_near_duplicates(docs, 0.2)[1] == 1


def test_decontamination_drops_shared_13_gram_only(tmp_path):
    words = ARTICLE.split()
    leaked = " ".join(words[10:23])  # exactly 13 words from the article
    short = " ".join(words[10:22])  # 12 words: below the n-gram length
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "Explain", "output": f"Answer: {leaked} end."}])
    eval_short = write_jsonl(tmp_path / "eval_short.jsonl", [{"text": short}])
    docs = [Document(ARTICLE, "a"), Document("An unrelated document about sockets and ports. " * 5, "b")]
    kept, removed = drop_contaminated(docs, excluded_ngrams([eval_file], 13), 13)
    assert [d.source for d in kept] == ["b"] and removed == 1
    kept, removed = drop_contaminated(docs, excluded_ngrams([eval_short], 13), 13)
    assert removed == 0


def test_split_is_deterministic_and_document_level():
    docs = [Document(f"document number {i} " + ARTICLE, f"s{i}") for i in range(200)]
    train, valid = split_documents(docs, 0.2)
    assert len(train) + len(valid) == 200 and 20 <= len(valid) <= 60
    # Same decision whatever the order or the company a document keeps.
    train2, valid2 = split_documents(list(reversed(docs))[:120], 0.2)
    assert {d.source for d in valid2} == {d.source for d in valid} & {d.source for d in docs[80:]}
    assert {d.source for d in train2} == {d.source for d in train} & {d.source for d in docs[80:]}


def test_split_small_set_still_has_validation():
    train, valid = split_documents([Document("one " + ARTICLE, "a"), Document("two " + ARTICLE, "b")], 0.1)
    assert len(train) == 1 and len(valid) == 1


def test_prepare_counts_each_removal_reason(tmp_path):
    (tmp_path / "a.txt").write_text(ARTICLE)
    (tmp_path / "b.txt").write_text(ARTICLE.lower())  # exact duplicate
    (tmp_path / "c.txt").write_text(ARTICLE.replace("periodically", "from time to time"))  # near
    (tmp_path / "d.txt").write_text("too short")
    (tmp_path / "e.txt").write_text("   \n\u200b\n")
    (tmp_path / "f.txt").write_text("Sockets and ports: " + " ".join(f"word{i}" for i in range(60)))
    eval_file = write_jsonl(tmp_path / "eval" / "e.jsonl", [{"text": " ".join(f"word{i}" for i in range(20, 40))}])
    prepared = prepare_documents(
        [tmp_path / f"{c}.txt" for c in "abcdef"], PrepareOptions(min_chars=50, exclude=[str(eval_file)], valid_ratio=0)
    )
    assert prepared.stats["removed"] == {
        "empty": 1,
        "too_short": 1,
        "exact_duplicate": 1,
        "near_duplicate": 1,
        "contaminated": 1,
        "unreadable": 0,
    }
    assert prepared.stats["documents_in"] == 6 and prepared.stats["documents_kept"] == 1
