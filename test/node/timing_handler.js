/*
 * A handler for the timing scenarios of test/e2e/e2e_agent.py
 * (agent_node_timing_late_telemetry): handler.js's work, with one
 * distinctive function log line printed at its start and one just before it
 * returns.
 *
 *   _HANDLER=timing_handler.logged
 *
 * The lines are printed the way AWS's Node.js runtime prints console.log in
 * its text log format ("<ISO time>\t<request id>\tINFO\t<message>"; the
 * minimal runtime here does not patch console), with a message the test
 * recognises:
 *   agent-node-timing line <n> <first|last> of <request id>
 *
 * Lambda captures a function's stdout as it is written, so a line is in the
 * Telemetry API stream before the invocation's platform.runtimeDone. The
 * test plays that capture by tailing the runtime's log; to keep the order,
 * the handler waits (at most 3 s) after each line until the test has handed
 * the line to the fake Lambda and says so by creating the file
 *   $APM_TEST_LOG_ACK/<request id>.<first|last>
 * Without APM_TEST_LOG_ACK it does not wait.
 *
 * The event is handler.js's (spans, errors, pad, delay_ms...) plus
 *   n        the invocation's number, for the message (default 0)
 */
'use strict';

const fs = require('fs');
const path = require('path');
const base = require('./handler');

const ACK_DIR = process.env.APM_TEST_LOG_ACK;

function acked(file) {
  return new Promise((resolve) => {
    const end = Date.now() + 3000;
    const poll = () => {
      if (fs.existsSync(file) || Date.now() > end) resolve();
      else setTimeout(poll, 2);
    };
    poll();
  });
}

async function say(context, n, which) {
  const rid = context.awsRequestId;
  const msg = `agent-node-timing line ${n} ${which} of ${rid}`;
  console.log(`${new Date().toISOString()}\t${rid}\tINFO\t${msg}`);
  if (ACK_DIR) await acked(path.join(ACK_DIR, `${rid}.${which}`));
}

async function logged(event, context) {
  const n = event.n === undefined ? 0 : event.n;
  await say(context, n, 'first');
  const result = await base.main(Object.assign({}, event, { action: 'spans' }), context);
  await say(context, n, 'last');
  return result;
}

module.exports = { logged };
