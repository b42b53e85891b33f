/*
 * Lambda handlers for apm-ext's end-to-end tests with the real Elastic APM
 * Node.js agent (test/e2e/e2e_agent.py, test/e2e/demo.py). Run by test/node/runtime.js
 * with NODE_OPTIONS=-r elastic-apm-node/start, which wraps the export named by
 * _HANDLER (e.g. _HANDLER=handler.main).
 *
 * Every id the handler makes (its transaction, each span, each captured
 * error) is written as one JSON line to the file named by APM_TEST_RECORD,
 * so that the test can match, id by id, what arrived at the fake APM server:
 *   {"rid":<awsRequestId>,"kind":"transaction","id":..,"trace_id":..}
 *   {"rid":..,"kind":"span","id":..,"trace_id":..,"parent_id":..,"transaction_id":..,"name":..}
 *   {"rid":..,"kind":"error","id":..,"trace_id":..,"transaction_id":..,"message":..}
 *   {"rid":..,"kind":"expect_error","message":..}   an error the agent captures itself
 *   {"rid":..,"kind":"stats","dropped":N,...}     the agent's own queue drops
 *   {"rid":..,"kind":"phase","phase":"flushed"|"sleeping"|"crashing"|"returning"}
 *
 * The event says what to do (all fields optional):
 *   action   "spans" (default) | "fail" | "sleep" | "crash" | "throw"
 *   spans    spans to create (default 3): an outer span, a span nested in it,
 *            then leaves alternating under the transaction and the outer span
 *   errors   errors to capture with apm.captureError (default 0)
 *   pad      bytes of random label text per span (makes payloads big)
 *   delay_ms time the work takes (default 5)
 *   sleep_ms how long "sleep" sleeps (default 60000: past any deadline)
 *   flush    for "sleep", "crash", "throw": apm.flush() first (default true),
 *            so the spans made so far reach the extension before the end
 *   exit     for "crash": the exit code (default 1)
 * How an invocation ends, by action, is test/node/actions.js, which both
 * test functions share.
 */
'use strict';

const crypto = require('crypto');
const { invoke, writeRecords, sleep } = require('./actions');
const apm = require('elastic-apm-node');



const tick = () => new Promise((resolve) => setImmediate(resolve));

/** Wait while the agent's event queue is long, so that it drops nothing. */
async function pace() {
  const client = apm._apmClient;
  const state = client && client._writableState;
  for (let i = 0; state && state.length > 256 && i < 5000; i++) {
    await sleep(1);
  }
  await tick();
}

function currentTransaction(rid, out) {
  const trans = apm.currentTransaction;
  if (!trans) throw new Error('no current transaction: the agent did not wrap the handler');
  out.push({ rid, kind: 'transaction', id: trans.id, trace_id: trans.traceId });
  return trans;
}

function startSpan(rid, out, trans, name, parent) {
  // childOf always: apm.startSpan() makes the new span the current one, so
  // without it each span would nest in the one started before.
  const want = parent || trans;
  const span = apm.startSpan(name, 'app', 'handler', 'work', { childOf: want });
  if (!span) throw new Error('apm.startSpan returned null for ' + name);
  if (span.parentId !== want.id || span.traceId !== trans.traceId) {
    throw new Error(`span ${name}: parent ${span.parentId}, want ${want.id}`);
  }
  out.push({
    rid, kind: 'span', id: span.id, trace_id: span.traceId,
    parent_id: want.id, transaction_id: trans.id, name,
  });
  return span;
}

function captureError(rid, out, trans, message) {
  return new Promise((resolve) => {
    apm.captureError(new Error(message), (err, id) => {
      if (err) throw err;
      out.push({ rid, kind: 'error', id, trace_id: trans.traceId,
        transaction_id: trans.id, message });
      resolve(id);
    });
  });
}

/** The work of one invocation: spans (an outer one, a nested one, leaves). */
async function doWork(event, context, out) {
  const rid = context.awsRequestId;
  const trans = currentTransaction(rid, out);
  const n = event.spans === undefined ? 3 : event.spans;
  const pad = event.pad || 0;
  const delay = event.delay_ms === undefined ? 5 : event.delay_ms;
  let outer = null;
  let inner = null;
  const open = [];
  for (let i = 0; i < n; i++) {
    let span;
    if (i === 0) {
      span = outer = startSpan(rid, out, trans, 'outer');
    } else if (i === 1) {
      span = inner = startSpan(rid, out, trans, 'inner', outer);
    } else {
      span = startSpan(rid, out, trans, 'leaf-' + i, i % 2 ? outer : null);
    }
    if (pad) span.setLabel('pad', crypto.randomBytes(Math.ceil(pad / 2)).toString('hex'));
    if (span === outer || span === inner) {
      open.push(span); // ended last, so that they contain the others
    } else {
      span.end();
    }
    if (i % 50 === 49) await pace();
  }
  if (delay) await sleep(delay);
  for (let i = 0; i < (event.errors || 0); i++) {
    await captureError(rid, out, trans, `handled error ${i} of ${rid}`);
  }
  while (open.length) open.pop().end();
  const client = apm._apmClient;
  out.push({ rid, kind: 'stats', dropped: client ? client._numEventsDropped : null,
    spans: n });
  return trans;
}

/** Hand the agent's buffered events to the extension now. */
function flush() {
  return apm.flush();
}

async function main(event, context) {
  return invoke(event, context, doWork, flush);
}

/** The same work, callback style: (event, context, callback). */
function callbackHandler(event, context, callback) {
  const out = [];
  doWork(event, context, out).then(() => {
    out.push({ rid: context.awsRequestId, kind: 'phase', phase: 'returning' });
    writeRecords(out);
    callback(null, { ok: true, requestId: context.awsRequestId, style: 'callback' });
  }, (err) => {
    writeRecords(out);
    callback(err);
  });
}

module.exports = {
  main,
  callback: callbackHandler,
  timeout: (event, context) => main(Object.assign({ action: 'sleep' }, event), context),
  crash: (event, context) => main(Object.assign({ action: 'crash' }, event), context),
};
