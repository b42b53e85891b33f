/*
 * The part the two test functions share: test/node/handler.js (the Elastic
 * APM agent) and test/otel/handler.js (the OpenTelemetry SDK) differ only in
 * the work they do and how they flush it; what an invocation does once that
 * work is done - return, fail, sleep past its deadline, crash, throw - is
 * chosen by event.action here, and every record goes to APM_TEST_RECORD.
 * The event's fields are described in each handler's header.
 */
'use strict';

const fs = require('fs');

const RECORD = process.env.APM_TEST_RECORD;

/** Append the records to APM_TEST_RECORD, one JSON line each, and empty the list. */
function writeRecords(lines) {
  if (RECORD && lines.length) {
    fs.appendFileSync(RECORD, lines.map((o) => JSON.stringify(o) + '\n').join(''));
  }
  lines.length = 0;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * One invocation: work(event, context, out) does the handler's work, then
 * event.action decides how it ends; flush(event, rid, out) hands what was made
 * so far to the extension before an end that would lose it (sleep, crash,
 * throw), unless event.flush is false.
 */
async function invoke(event, context, work, flush) {
  const out = [];
  const rid = context.awsRequestId;
  const action = event.action || 'spans';
  const flushFirst = () => (event.flush === false ? null : flush(event, rid, out));
  try {
    await work(event, context, out);
    switch (action) {
      case 'spans':
        out.push({ rid, kind: 'phase', phase: 'returning' });
        return { ok: true, requestId: rid };
      case 'fail': {
        const message = 'handler failed on purpose in ' + rid;
        out.push({ rid, kind: 'expect_error', message });
        out.push({ rid, kind: 'phase', phase: 'returning' });
        throw new Error(message);
      }
      case 'sleep':
        await flushFirst();
        out.push({ rid, kind: 'phase', phase: 'sleeping',
          remaining_ms: context.getRemainingTimeInMillis() });
        writeRecords(out);
        await sleep(event.sleep_ms || 60000);
        return { ok: true, slept: true };
      case 'crash':
        await flushFirst();
        out.push({ rid, kind: 'phase', phase: 'crashing' });
        writeRecords(out);
        process.exit(event.exit === undefined ? 1 : event.exit);
        break;
      case 'throw': {
        await flushFirst();
        const message = 'uncaught exception on purpose in ' + rid;
        out.push({ rid, kind: 'expect_error', message, unhandled: true });
        out.push({ rid, kind: 'phase', phase: 'crashing' });
        writeRecords(out);
        setTimeout(() => { throw new Error(message); }, 1);
        await sleep(60000);
        return { ok: false };
      }
      default:
        throw new Error('unknown action ' + action);
    }
  } finally {
    writeRecords(out);
  }
}

module.exports = { invoke, writeRecords, sleep };
