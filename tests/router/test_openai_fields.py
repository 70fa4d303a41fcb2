"""Ignored request fields are remembered for the log's warn-once, within a bound."""

from __future__ import annotations

from hilm_vllm.router import openai_api


def test_the_names_remembered_for_warn_once_are_bounded(monkeypatch, caplog):
    monkeypatch.setattr(openai_api, "_warned_fields", set())
    with caplog.at_level("WARNING", logger=openai_api.logger.name):
        openai_api.log_ignored(["repetition_penalty"])
        openai_api.log_ignored(["repetition_penalty"])
    assert [r.getMessage().count("repetition_penalty") for r in caplog.records] == [1]
    for i in range(3 * openai_api.MAX_WARNED_FIELDS):  # a client inventing names
        openai_api.log_ignored([f"field_{i}"])
    assert len(openai_api._warned_fields) == openai_api.MAX_WARNED_FIELDS
