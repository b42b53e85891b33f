/*
 * A Lambda handler instrumented with the OpenTelemetry JS SDK, for apm-ext's
 * end-to-end tests (test/e2e/e2e_otel.py) and demo (make demo OTEL=1). Run by
 * test/node/runtime.js with NODE_OPTIONS="-r test/otel/otel-init.js", whose
 * AwsLambdaInstrumentation wraps the export named by _HANDLER (handler.main):
 * it starts the invocation's SERVER span around the handler and force-flushes
 * traces and metrics before the result goes back to the runtime.
 *
 * Everything the handler makes is written as one JSON line to the file named
 * by APM_TEST_RECORD, so that the test can match it at the fake APM server:
 *   {"rid":..,"kind":"invocation","id":..,"trace_id":..}   the instrumentation's span
 *   {"rid":..,"kind":"span","id":..,"trace_id":..,"parent_id":..,"name":..}
 *   {"rid":..,"kind":"log","body":..,"trace_id":..,"span_id":..}
 *   {"rid":..,"kind":"metric","name":"apm_ext_test.invocations","value":N}
 *                         the counter's cumulative value after this invocation
 *   {"rid":..,"kind":"expect_error","message":..}
 *   {"rid":..,"kind":"phase","phase":"flushed"|"sleeping"|"crashing"|"returning"}
 *
 * The event says what to do (all fields optional):
 *   action   "spans" (default) | "fail" | "sleep" | "crash" | "throw"
 *   spans    spans to create (default 3): an outer one, one nested in it, then
 *            leaves alternating under the invocation span and the outer one
 *   logs     log records to emit, each in the context of a span (default 1;
 *            flushed before the handler returns: the instrumentation does not)
 *   pad      bytes of random attribute text per span (bigger payloads)
 *   delay_ms time the work takes (default 5)
 *   sleep_ms how long "sleep" sleeps (default 60000: past any deadline)
 *   flush    for "sleep", "crash", "throw": flush the SDK first (default true)
 *   exit     for "crash": the exit code (default 1)
 * How an invocation ends, by action, is test/node/actions.js, which both
 * test functions share.
 */
'use strict';

const crypto = require('crypto');
const { invoke, sleep } = require('../node/actions');
const api = require('@opentelemetry/api');
const { logs, SeverityNumber } = require('@opentelemetry/api-logs');
const otel = require('./otel-init');

const tracer = api.trace.getTracer('apm-ext-test-handler', '1.0.0');
const meter = api.metrics.getMeter('apm-ext-test-handler', '1.0.0');
const logger = logs.getLogger('apm-ext-test-handler', '1.0.0');
const counter = meter.createCounter('apm_ext_test.invocations', {
  description: 'invocations handled by this process' });
const duration = meter.createHistogram('apm_ext_test.work_ms', { unit: 'ms' });
let invocations = 0;



function startSpan(rid, out, name, parentSpan) {
  const ctx = api.trace.setSpan(api.context.active(), parentSpan);
  const span = tracer.startSpan(name, { kind: api.SpanKind.INTERNAL }, ctx);
  const sc = span.spanContext();
  const pc = parentSpan.spanContext();
  if (sc.traceId !== pc.traceId) throw new Error(`span ${name} is not in its parent's trace`);
  out.push({ rid, kind: 'span', id: sc.spanId, trace_id: sc.traceId, parent_id: pc.spanId,
    name });
  return span;
}

function emitLog(rid, out, span, body) {
  const sc = span.spanContext();
  logger.emit({
    severityNumber: SeverityNumber.INFO, severityText: 'INFO', body,
    attributes: { 'faas.invocation_id': rid },
    context: api.trace.setSpan(api.context.active(), span),
  });
  out.push({ rid, kind: 'log', body, trace_id: sc.traceId, span_id: sc.spanId });
}

/** The work of one invocation: spans, log records, metrics. */
async function doWork(event, context, out) {
  const rid = context.awsRequestId;
  const inv = api.trace.getActiveSpan();
  if (!inv || !api.trace.isSpanContextValid(inv.spanContext())) {
    throw new Error('no active span: the aws-lambda instrumentation did not wrap the handler');
  }
  const ic = inv.spanContext();
  out.push({ rid, kind: 'invocation', id: ic.spanId, trace_id: ic.traceId });
  const t0 = Date.now();
  const n = event.spans === undefined ? 3 : event.spans;
  const pad = event.pad || 0;
  const delay = event.delay_ms === undefined ? 5 : event.delay_ms;
  let outer = null;
  const open = [];
  for (let i = 0; i < n; i++) {
    let span;
    if (i === 0) {
      span = outer = startSpan(rid, out, 'outer', inv);
    } else if (i === 1) {
      span = startSpan(rid, out, 'inner', outer);
    } else {
      span = startSpan(rid, out, 'leaf-' + i, i % 2 ? outer : inv);
    }
    span.setAttribute('apm_ext_test.index', i);
    if (pad) span.setAttribute('pad', crypto.randomBytes(Math.ceil(pad / 2)).toString('hex'));
    if (i < 2) open.push(span); else span.end();
    if (i % 100 === 99) await new Promise((resolve) => setImmediate(resolve));
  }
  const nlogs = event.logs === undefined ? 1 : event.logs;
  for (let i = 0; i < nlogs; i++) {
    emitLog(rid, out, open.length ? open[0] : inv, `otel log ${i} of ${rid}`);
  }
  if (delay) await sleep(delay);
  while (open.length) open.pop().end();
  invocations += 1;
  counter.add(1);
  duration.record(Date.now() - t0);
  out.push({ rid, kind: 'metric', name: 'apm_ext_test.invocations', value: invocations });
  if (nlogs) await otel.flushLogs();
}

/** Export what the SDK holds now (traces, metrics, logs). */
async function flush(event, rid, out) {
  await otel.flushAll();
  out.push({ rid, kind: 'phase', phase: 'flushed' });
}

async function main(event, context) {
  return invoke(event, context, doWork, flush);
}

module.exports = { main };
