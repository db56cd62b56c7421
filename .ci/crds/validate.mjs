// Validates Kubernetes objects of CRD kinds against those CRDs' OpenAPI schemas,
// as generated into @kubernetes-models (types, enums, patterns, required fields,
// list and string bounds). kubernetes-validate only knows built-in kinds and
// merely warns on these.
//
//   node .ci/crds/validate.mjs objects.json...    (each file: a JSON array of objects)
//
// Exit 1 when an object fails its schema or is of a kind with no schema here.
// What the schemas do not catch: a misspelt optional field (the CRDs' schemas
// do not forbid unknown fields; the API server drops them, or refuses them
// with kubectl's strict field validation).
import { readFileSync } from "node:fs";
import { HTTPRoute } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/HTTPRoute";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const MODELS = new Map(
  [HTTPRoute, PodMonitor, PrometheusRule].map((m) => [`${m.apiVersion} ${m.kind}`, m]),
);

let failed = 0;
let checked = 0;
for (const file of process.argv.slice(2)) {
  for (const object of JSON.parse(readFileSync(file, "utf8"))) {
    const key = `${object.apiVersion} ${object.kind}`;
    const name = `${file}: ${object.kind}/${object.metadata?.name}`;
    const Model = MODELS.get(key);
    if (Model === undefined) {
      console.error(`ERROR ${name}: no schema for ${key}`);
      failed++;
      continue;
    }
    try {
      new Model(object).validate();
      checked++;
      console.log(`ok ${name}`);
    } catch (error) {
      console.error(`ERROR ${name}: ${error.message}`);
      failed++;
    }
  }
}
if (checked === 0 && failed === 0) {
  console.error("ERROR nothing to validate");
  process.exit(1);
}
process.exit(failed ? 1 : 0);
