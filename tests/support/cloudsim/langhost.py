"""The emulated Python language host + engine: runs the REAL stack program under Pulumi's mock runtime.

Started by the `pulumi` double as `<PULUMI_PYTHON_CMD or python3> langhost.py REQUEST RESULT` with the stack
directory as working directory, as Pulumi's Python language host runs `__main__.py` there. The mock monitor
below plays the engine: every resource the program registers is diffed against the stack's last state
(_providers.diff, honouring `ignore_changes`), and answered with the ids and outputs the emulated cloud
reports (kept for unchanged resources, minted for new and replaced ones), so the program's later resources
see real-looking ids, exactly as they would see the cloud's. Invokes (AMI lookup, zones) are answered by
_providers.invoke. Provider credentials are checked when the program first uses a provider.

Standard library + pulumi only (this runs in the user's interpreter). Writes RESULT as JSON:
`{ok, error, registrations: [...], stack_outputs, providers}`.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _providers as P  # noqa: E402

sys.path.remove(str(HERE))  # the program must not see our modules

try:
    import pulumi
    from pulumi.runtime import mocks as pmocks
    from pulumi.runtime import rpc
    from pulumi.runtime import settings as psettings
    from pulumi.runtime.proto import resource_pb2
    from pulumi.runtime.sync_await import _ensure_event_loop, _sync_await
except ImportError:
    print(traceback.format_exc(), file=sys.stderr)
    print("It looks like the Pulumi SDK has not been installed. Have you run pip install?\n"
          "If you are running in a virtualenv, you must run pip install -r requirements.txt from inside the "
          "virtualenv.", file=sys.stderr)
    sys.exit(1)


PROVIDER_PACKAGES = {"aws": "pulumi_aws", "azure-native": "pulumi_azure_native"}


class Engine(pmocks.Mocks):
    def __init__(self, req: dict) -> None:
        self.req = req
        self.stack, self.project = req["stack"], req["project"]
        self.old: dict[str, dict] = req["old"]
        self.records: list[dict] = []
        self.component_outputs: dict[str, dict] = {}
        self.providers: dict[str, dict] = {}
        self.error: str | None = None
        self.cloud = P.Cloud(
            region=req.get("region") or "", subscription=req.get("subscription") or "",
            public_net=req.get("public_net"), used_public=set(req.get("used_public", [])),
            by_id={r["id"]: dict(r.get("outputs") or {}) for r in self.old.values() if r.get("id")},
        )

    # --- urns and default providers ------------------------------------------------------------------

    @property
    def root_urn(self) -> str:
        return f"urn:pulumi:{self.stack}::{self.project}::pulumi:pulumi:Stack::{self.project}-{self.stack}"

    def urn(self, parent: str, typ: str, name: str) -> str:
        qualified = typ
        if parent and parent != self.root_urn:
            qualified = parent.split("::")[2] + "$" + typ
        return f"urn:pulumi:{self.stack}::{self.project}::{qualified}::{name}"

    def provider_ref(self, token: str) -> str:
        """The default provider of the token's package (created once, credentials checked like Configure)."""
        pkg = P.package_of(token)
        if pkg in self.providers:
            return self.providers[pkg]["ref"]
        try:
            from importlib.metadata import version
            ver = version(PROVIDER_PACKAGES.get(pkg, pkg))
        except Exception:  # noqa: BLE001 - an unknown package keeps a generic name
            ver = "0.0.0"
        name = "default_" + ver.replace(".", "_")
        urn = f"urn:pulumi:{self.stack}::{self.project}::pulumi:providers:{pkg}::{name}"
        P.check_credentials(pkg, os.environ, self.req["config"], name)
        old = self.old.get(urn)
        pid = old["id"] if old else str(P.uuid.uuid4())
        inputs = {"version": ver}
        if pkg == "aws":
            inputs["region"] = self.req["config"].get("aws:region", "")
        elif pkg == "azure-native":
            inputs["location"] = self.req["config"].get("azure-native:location", "")
        op = "same" if old and old.get("inputs") == inputs else ("update" if old else "create")
        self.providers[pkg] = {"urn": urn, "id": pid, "ref": f"{urn}::{pid}", "inputs": inputs, "op": op}
        return self.providers[pkg]["ref"]

    # --- the engine's part of a registration ---------------------------------------------------------

    def register(self, request, inputs: dict) -> tuple[str, dict, str]:
        typ, name, custom = request.type, request.name, bool(request.custom)
        urn = self.urn(request.parent, typ, name)
        inputs = P.normalize(inputs, drop_none=True)
        old = self.old.get(urn)
        ignore = list(request.ignoreChanges)
        rec = {
            "urn": urn, "type": typ, "name": name, "custom": custom,
            "parent": request.parent or "", "dependencies": sorted(set(request.dependencies)),
            "propertyDependencies": {k: sorted(set(v.urns)) for k, v in request.propertyDependencies.items()},
            "ignoreChanges": ignore, "protect": bool(request.protect),
            "deleteBeforeReplace": bool(request.deleteBeforeReplace),
            "diffs": [], "replaces": [], "provider": "",
        }
        if not custom:
            rec.update(op="same" if old else "create", id="", inputs={}, outputs={})
            self.records.append(rec)
            return "", {}, urn
        rec["provider"] = self.provider_ref(typ)
        if old and ignore:  # the engine puts the old value back (or drops the new one) before diffing
            old_in = old.get("inputs", {})
            for key in ignore:
                top = key.split(".", 1)[0].split("[", 1)[0]
                if top in old_in:
                    inputs[top] = old_in[top]
                else:
                    inputs.pop(top, None)
        if old is None:
            rid, out = P.create(typ, name, inputs, self.cloud)
            op, diffs, replaces = "create", [], []
        else:
            diffs, replaces = P.diff(typ, old.get("inputs", {}), inputs)
            if replaces:
                rid, out = P.create(typ, name, inputs, self.cloud)
                op = "replace"
                rec["deleteBeforeReplace"] = rec["deleteBeforeReplace"] or P.TYPES[typ].delete_before_replace
            elif diffs:
                rid = old["id"]
                out = P.update(typ, rid, old.get("outputs", {}), inputs, self.cloud)
                op = "update"
            else:
                rid, out, op = old["id"], dict(old.get("outputs", {})), "same"
        rec.update(op=op, id=rid, inputs=inputs, outputs=P.normalize(out), diffs=diffs, replaces=replaces)
        self.records.append(rec)
        return rid, out, urn

    # Mocks interface (invokes); resources go through Monitor.RegisterResource below
    def call(self, args: pmocks.MockCallArgs):
        self.provider_ref(args.token)
        return P.invoke(args.token, P.normalize(dict(args.args), drop_none=True), self.cloud), []

    def new_resource(self, args: pmocks.MockResourceArgs):  # pragma: no cover - replaced by Monitor
        raise AssertionError("registrations go through Monitor.RegisterResource")


class Monitor(pmocks.MockMonitor):
    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.engine = engine

    def RegisterResource(self, request):  # noqa: N802 - gRPC method name
        if request.type == "pulumi:pulumi:Stack":
            return resource_pb2.RegisterResourceResponse(urn=self.engine.root_urn)
        _ensure_event_loop()
        inputs = rpc.deserialize_properties(request.object)
        try:
            rid, outputs, urn = self.engine.register(request, dict(inputs))
        except P.ProviderError as exc:
            self.engine.error = self.engine.error or str(exc)
            raise
        obj = _sync_await(rpc.serialize_properties(outputs, {}))
        self.resources[urn] = pmocks.MockMonitor.ResourceRegistration(urn, rid, outputs)
        return resource_pb2.RegisterResourceResponse(urn=urn, id=rid, object=obj)

    def Invoke(self, request):  # noqa: N802
        try:
            return super().Invoke(request)
        except P.ProviderError as exc:
            self.engine.error = self.engine.error or str(exc)
            raise

    def RegisterResourceOutputs(self, request):  # noqa: N802
        outputs = rpc.deserialize_properties(request.outputs) if request.outputs else {}
        self.engine.component_outputs[request.urn] = P.normalize(dict(outputs))
        return super().RegisterResourceOutputs(request)


def main() -> int:
    req = json.loads(Path(sys.argv[1]).read_text())
    result_path = Path(sys.argv[2])
    engine = Engine(req)
    config = req["config"]
    os.environ["PULUMI_CONFIG"] = json.dumps(config)
    pulumi.runtime.set_all_config(config)
    psettings.ROOT.set(None)
    pulumi.runtime.set_mocks(engine, project=req["project"], stack=req["stack"], preview=req["preview"],
                             monitor=Monitor(engine))
    stack_outputs: dict = {}
    error = None

    @pulumi.runtime.test
    def program():
        import runpy

        runpy.run_path("__main__.py", run_name="__main__")
        root = psettings.get_root_resource()
        return pulumi.Output.from_input(dict(root.outputs)).apply(stack_outputs.update)

    try:
        program()
    except pulumi.RunError as exc:
        error = str(exc)
    except P.ProviderError as exc:
        error = str(exc)
    except Exception:  # noqa: BLE001 - shown to the user as Pulumi does
        error = "Program failed with an unhandled exception:\n" + traceback.format_exc()
    if engine.error:  # a provider refused: that is the error the CLI shows, whatever the SDK made of it
        error = engine.error
    result = {
        "ok": error is None,
        "error": error,
        "root_urn": engine.root_urn,
        "registrations": engine.records,
        "component_outputs": engine.component_outputs,
        "stack_outputs": P.normalize(stack_outputs),
        "providers": list(engine.providers.values()),
    }
    result_path.write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
