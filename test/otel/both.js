/*
 * One function, two instrumentations: the Elastic APM Node.js agent and the
 * OpenTelemetry SDK in the same runtime, for test/e2e/e2e_otel.py's
 * otel_and_elastic_agent_together. Run by test/node/runtime.js with
 * NODE_OPTIONS="-r elastic-apm-node/start -r test/otel/otel-init.js",
 * APM_TEST_OTEL_LAMBDA=off, _HANDLER=both.main.
 *
 * The Elastic agent wraps this export (its transaction, ?flushed=true at the
 * end); inside, test/node/handler.js does the Elastic work and records it as
 * usual, while this file makes OpenTelemetry spans by hand: a root span for
 * the invocation and `otel_spans` children (default 2), then force-flushes
 * the SDK before returning, as manual OpenTelemetry users in Lambda do. (The
 * aws-lambda instrumentation cannot wrap the handler too: the Elastic agent
 * defines the wrapped export as non-configurable, and the second wrapper
 * fails with "Cannot redefine property".)
 *
 * Records (APM_TEST_RECORD), besides handler.js's:
 *   {"rid":..,"kind":"otel_span","id":..,"trace_id":..,"parent_id":..|null,"name":..}
 */
'use strict';

const fs = require('fs');
const api = require('@opentelemetry/api');
const otel = require('./otel-init');
const elastic = require('../node/handler.js');

const RECORD = process.env.APM_TEST_RECORD;
const tracer = api.trace.getTracer('apm-ext-test-both', '1.0.0');

function writeRecords(lines) {
  if (RECORD && lines.length) {
    fs.appendFileSync(RECORD, lines.map((o) => JSON.stringify(o) + '\n').join(''));
  }
  lines.length = 0;
}

async function main(event, context) {
  const rid = context.awsRequestId;
  const out = [];
  const root = tracer.startSpan('otel invocation', {
    kind: api.SpanKind.SERVER, attributes: { 'faas.invocation_id': rid } }, api.ROOT_CONTEXT);
  const rc = root.spanContext();
  out.push({ rid, kind: 'otel_span', id: rc.spanId, trace_id: rc.traceId, parent_id: null,
    name: 'otel invocation' });
  const ctx = api.trace.setSpan(api.ROOT_CONTEXT, root);
  try {
    for (let i = 0; i < (event.otel_spans === undefined ? 2 : event.otel_spans); i++) {
      const s = tracer.startSpan('otel child ' + i, {}, ctx);
      out.push({ rid, kind: 'otel_span', id: s.spanContext().spanId, trace_id: rc.traceId,
        parent_id: rc.spanId, name: 'otel child ' + i });
      s.end();
    }
    return await api.context.with(ctx, () => elastic.main(event, context));
  } finally {
    root.end();
    writeRecords(out);
    await otel.flushAll();
  }
}

module.exports = { main };
