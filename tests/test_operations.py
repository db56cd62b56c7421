"""What the operation table derives, checked on a row it does not hold (no process).

A new upstream operation is one row of ``sidecar/http/operations.py``: its log
names, its OpenAPI request schema and parameters, and the clients' methods with
the SDK's keywords come from the row. Here a made-up row (a new path id, a
required and an optional field, a query flag) goes through each derivation.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import vellum_sidecar_client as vsc

from sidecar.http.operations import OPERATIONS, Answer, Field, Operation, id_field, snake

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

#: An operation the table does not have: a new path id (``note``), fields, a query flag.
NEW = Operation(
    "archive_note",
    "POST",
    "/accounts/{account}/notes/{note}/archive",
    "Archive an account's note, and with it every reply, mention and attachment the note "
    "gathered since it was written (a summary too long for one line)",
    Answer(200, "the archived note", "Customer"),
    newer=True,
    request="ArchiveNoteRequest",
    fields=(Field("reason", "string", True), Field("notifyOwner", "boolean", default=False)),
    query=(Field("dryRun", "boolean", default=False),),
    drops="account",
)


def load(monkeypatch: pytest.MonkeyPatch, name: str) -> Any:
    """A generator of ``scripts/``, with the made-up row added to its table."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    module = importlib.import_module(name)
    monkeypatch.setattr(module, "OPERATIONS", (*OPERATIONS, NEW))
    return module


def test_names_derived_from_a_row() -> None:
    assert [id_field(p) for p in ("account", "credit_type", "note")] == [
        "accountId",
        "creditTypeId",
        "noteId",
    ]
    assert [snake(n) for n in ("addOnModuleIds", "planId", "seats")] == [
        "add_on_module_ids",
        "plan_id",
        "seats",
    ]
    assert NEW.params == ("account", "note") and NEW.sdk == ("archive_note",)
    assert [f.arg for f in NEW.fields] == ["reason", "notify_owner"]
    assert NEW.query_ids == () and NEW.required == ("reason",)


def test_every_row_names_its_arguments_once() -> None:
    """The clients take a row's ids, fields and query as keywords: none may collide."""
    for op in (*OPERATIONS, NEW):
        names = [id_field(p) for p in op.params] + [f.name for f in (*op.fields, *op.query)]
        assert len(names) == len(set(names)), op.name
        assert len(op.sdk) == len(set(op.sdk)) >= 1, op.name


def test_openapi_derives_the_request_schema_and_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = load(monkeypatch, "gen_openapi")
    doc = gen.build(gen.json.loads(gen.BASE.read_text(encoding="utf-8")))
    post = doc["paths"]["/v1/accounts/{account}/notes/{note}/archive"]["post"]
    assert post["operationId"] == "archiveNote"
    assert "newer than vellumcharter 1.4.2" in post["description"]
    schema = doc["components"]["schemas"]["ArchiveNoteRequest"]
    assert schema["required"] == ["reason"]
    assert schema["properties"]["reason"] == {"type": "string", "minLength": 1}
    assert schema["properties"]["notifyOwner"] == {"type": "boolean", "default": False}
    parameters = doc["components"]["parameters"]
    assert parameters["note"]["in"] == "path" and parameters["note"]["schema"]["maxLength"] == 512
    assert parameters["dryRun"] == {
        "name": "dryRun",
        "in": "query",
        "required": False,
        "schema": {"type": "boolean", "default": False},
    }
    mirror = doc["paths"]["/tenants/{tenant}/accounts/{account}/notes/{note}/archive"]["post"]
    assert mirror["operationId"] == "mirrorArchiveNote"
    # A schema the base does describe must agree with the row.
    wrong = Operation(**{**_fields(NEW), "request": "StatusRequest"})
    with pytest.raises(SystemExit, match="required"):
        gen.request_schema(doc, wrong)


def test_the_clients_get_a_method_with_the_sdks_keywords(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = load(monkeypatch, "gen_clients")
    source = gen.python_method(NEW, "archive_note")
    namespace = dict(vars(vsc))
    exec(compile(f"class Client:\n{source}\n", "<generated>", "exec"), namespace)  # noqa: S102
    method = namespace["Client"].archive_note
    assert inspect.iscoroutinefunction(method)
    params = list(inspect.signature(method).parameters.values())[1:]
    assert [(p.name, p.default) for p in params] == [
        ("account_id", inspect.Parameter.empty),
        ("note_id", inspect.Parameter.empty),
        ("reason", inspect.Parameter.empty),
        ("notify_owner", False),
        ("dry_run", False),
        ("idempotency_key", None),
    ]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    assert '"notifyOwner": notify_owner or None' in source, "a flag is sent only when true"
    docstring = source[source.index('"""') : source.rindex('"""') + 3].splitlines()
    assert len(docstring) == 2 and max(len(line) for line in docstring) <= 100, "wrapped"
    assert '_query({"dryRun": "true" if dry_run else None})' in source
    js = gen.js_method(NEW, "archive_note")
    assert "accountId, noteId, reason, notifyOwner = false, dryRun = false, idempotencyKey" in js
    assert "notifyOwner: notifyOwner ? true : undefined" in js
    assert js.startswith("  /**\n   * Archive an account's note,"), "a long summary is wrapped"
    assert "const ids = { account: accountId, note: noteId };" in js
    dts = gen.dts_args([(NEW, "archive_note")]) + gen.dts_methods([(NEW, "archive_note")])
    assert "export interface ArchiveNoteArgs extends WriteOptions {" in dts
    assert "  noteId: string;\n  reason: string;\n  notifyOwner?: boolean;" in dts
    assert "archiveNote(args: ArchiveNoteArgs): Promise<JsonObject>;" in dts


def test_a_row_two_sdk_methods_share_needs_them_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = load(monkeypatch, "gen_clients")
    shared = next(op for op in OPERATIONS if op.name == "change_add_ons")
    assert gen.generated(shared, {"add_add_on", "remove_add_on"}) == []
    with pytest.raises(SystemExit, match="write remove_add_on by hand"):
        gen.generated(shared, {"add_add_on"})


def _fields(op: Operation) -> dict[str, Any]:
    return {name: getattr(op, name) for name in inspect.signature(Operation).parameters}
