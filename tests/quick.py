"""The quick subset (`python -m pytest -m quick`): one fast test per `evotok` command (and the lm-eval
model), so that a change can be checked in a few minutes; CI still runs everything.

`QUICK` names the tests; the `quick` marker is added to them at collection (a pytest plugin listed in
tests/conftest.py's pytest_plugins), and tests/test_quick.py fails when a command has no quick test, when a
named test no longer exists, or when a named test never invokes its command.
"""

from __future__ import annotations

import pytest

# command (as `evotok ...` spells it) -> test node ids (without parameters), each of which runs it
QUICK: dict[str, list[str]] = {
    "info": ["tests/test_cli.py::test_info_json", "tests/test_threads.py::test_info_system_says_what_and_why"],
    "decoders": ["tests/test_cli.py::test_decoders_list_and_details"],
    "generate": ["tests/test_cli.py::test_generate_json_schema",
                 "tests/test_hub.py::test_model_id_decodes_from_the_cache_as_its_folder_does",
                 "tests/test_threads.py::test_generate_threads_set_torch_and_json_params"],
    "init-model": ["tests/test_cli.py::test_init_model_one_liner"],
    "data": ["tests/test_outputs_and_locks.py::test_a_stale_lock_is_taken_over_with_a_note"],
    "finetune": ["tests/test_threads.py::test_finetune_records_threads_and_may_change_them_on_resume"],
    "bench": ["tests/test_bench_progress.py::test_bench_without_batch_size_uses_the_default_and_says_so",
              "tests/test_bench_progress.py::test_bench_help_lists_every_run_option"],
    "bench score": ["tests/test_bench_run.py::test_score_official_files"],
    "bench report": ["tests/test_bench_run.py::test_score_and_report_our_run"],
    "trace": ["tests/test_viz.py::test_cli_empty_or_missing_file"],
    "serve": ["tests/test_serve.py::test_a_port_in_use_is_one_line",
              "tests/test_serve_dropin.py::test_strict_refuses_unknown_fields"],
    "lm-eval model": ["tests/test_threads.py::test_lmeval_model_args_threads"],
    "chat": ["tests/test_chat.py::test_two_turns_with_show_keep_the_history_and_replay_through_generate"],
    "download": ["tests/test_hub.py::test_download_fetches_only_weights_configs_and_tokenizers"],
}
# what a quick test's source must hold to count as running its command: by default the command's last word
# in quotes, as the `cli` fixture and argv lists spell it (checked by tests/test_quick.py)
INVOKES = {"lm-eval model": ("EvotokLM",), "serve": ('"serve"', "create_app("), "chat": ("chat(cli",)}


def quick_ids() -> set[str]:
    return {node for nodes in QUICK.values() for node in nodes}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = quick_ids()
    for item in items:
        if item.nodeid.split("[", 1)[0] in wanted:
            item.add_marker(pytest.mark.quick)
