#!/usr/bin/env node
/*
 * A minimal AWS Lambda runtime for Node.js (stdlib only), for apm-ext's
 * end-to-end tests and demo: it plays the part of AWS's own Node runtime
 * (aws-lambda-nodejs-runtime-interface-client) in front of the fake control
 * plane (test/fakes/fake_lambda.py).
 *
 *   AWS_LAMBDA_RUNTIME_API=127.0.0.1:9001 _HANDLER=handler.main \
 *   LAMBDA_TASK_ROOT=test/node NODE_PATH=test/node/node_modules \
 *   NODE_OPTIONS='-r elastic-apm-node/start' AWS_LAMBDA_FUNCTION_NAME=fn \
 *   node test/node/runtime.js
 *
 * What it does the way Lambda's runtime does, because the Elastic agent
 * depends on it:
 * - The handler module is loaded with require() of its absolute path
 *   LAMBDA_TASK_ROOT/<dir>/<module>{,.js,.cjs}: the agent (started earlier by
 *   NODE_OPTIONS=-r elastic-apm-node/start) hooks exactly that file, found
 *   from _HANDLER, and wraps the export named by it.
 * - The handler is called as handler(event, context, callback). The context
 *   object carries succeed/fail/done, and a promise returned by the handler is
 *   settled through context.succeed/context.fail *read at settle time*: the
 *   agent replaces those methods on the context object to end and flush its
 *   transaction before the runtime answers.
 * - callback(null, result) waits for the event loop to empty ('beforeExit')
 *   unless context.callbackWaitsForEmptyEventLoop is false; the first of
 *   callback/succeed/fail/done wins.
 * - An uncaught exception or unhandled rejection is posted as the invocation's
 *   error, then the process exits (129 / 128), as AWS's runtime does.
 *
 * Its own calls to the Runtime API use a raw net socket with a tiny HTTP/1.1
 * client, never the http module: the agent instruments http, and Lambda's
 * runtime traffic must not show up as spans. The socket is unref'd while idle
 * so that it does not keep the event loop alive ('beforeExit' must fire).
 *
 * Diagnostics go to stderr as lines starting with "runtime: ".
 */
'use strict';

const fs = require('fs');
const net = require('net');
const path = require('path');

const API_PREFIX = '/2018-06-01/runtime';

function diag(msg) {
  process.stderr.write('runtime: ' + msg + '\n');
}

// ------------------------------------------------------------ HTTP client

/**
 * Sequential HTTP/1.1 requests over one kept-alive TCP connection to the
 * Runtime API. request() resolves {status, headers (lower-case), body}.
 */
class RuntimeApiClient {
  constructor(hostport) {
    const i = hostport.lastIndexOf(':');
    this.host = hostport.slice(0, i).replace(/^\[|\]$/g, '');
    this.port = Number(hostport.slice(i + 1));
    this.hostport = hostport;
    this.sock = null;
    this.buf = Buffer.alloc(0);
    this.pending = null; // {resolve, reject} of the request in flight
    this.queue = Promise.resolve();
  }

  request(method, urlPath, body, headers) {
    const run = () => this._request(method, urlPath, body, headers);
    const p = this.queue.then(run, run);
    this.queue = p.catch(() => {});
    return p;
  }

  _connect() {
    return new Promise((resolve, reject) => {
      const sock = net.connect({ host: this.host, port: this.port });
      sock.setNoDelay(true);
      const onErr = (err) => reject(err);
      sock.once('error', onErr);
      sock.once('connect', () => {
        sock.removeListener('error', onErr);
        sock.on('data', (d) => this._onData(d));
        sock.on('error', (err) => this._fail(err));
        sock.on('close', () => {
          if (this.sock === sock) this.sock = null;
          this._fail(new Error('Runtime API connection closed'));
        });
        resolve(sock);
      });
    });
  }

  _fail(err) {
    const p = this.pending;
    if (p) {
      this.pending = null;
      p.reject(err);
    }
  }

  async _request(method, urlPath, body, headers) {
    if (!this.sock || this.sock.destroyed) {
      this.buf = Buffer.alloc(0);
      this.sock = await this._connect();
    }
    const data = body == null ? Buffer.alloc(0) : Buffer.from(body);
    let head = `${method} ${urlPath} HTTP/1.1\r\nHost: ${this.hostport}\r\n` +
      `Content-Length: ${data.length}\r\n`;
    for (const [k, v] of Object.entries(headers || {})) head += `${k}: ${v}\r\n`;
    head += '\r\n';
    const sock = this.sock;
    sock.ref(); // an outstanding request keeps the process alive (long poll)
    try {
      return await new Promise((resolve, reject) => {
        this.pending = { resolve, reject };
        sock.write(Buffer.concat([Buffer.from(head, 'latin1'), data]));
        this._onData(Buffer.alloc(0));
      });
    } finally {
      if (this.sock === sock) sock.unref(); // idle: must not hold the event loop
    }
  }

  _onData(d) {
    this.buf = Buffer.concat([this.buf, d]);
    if (!this.pending) return;
    const res = parseResponse(this.buf);
    if (res === null) return; // need more bytes
    this.buf = this.buf.subarray(res.consumed);
    const p = this.pending;
    this.pending = null;
    if (res.close && this.sock) {
      this.sock.destroy();
      this.sock = null;
    }
    p.resolve(res);
  }
}

/**
 * Parse one HTTP/1.1 response at the start of buf: null if incomplete, else
 * {status, headers, body, consumed, close}. Content-Length or chunked.
 */
function parseResponse(buf) {
  const end = buf.indexOf('\r\n\r\n');
  if (end < 0) return null;
  const lines = buf.subarray(0, end).toString('latin1').split('\r\n');
  const status = Number(lines[0].split(' ')[1]);
  const headers = {};
  for (const line of lines.slice(1)) {
    const c = line.indexOf(':');
    if (c > 0) headers[line.slice(0, c).trim().toLowerCase()] = line.slice(c + 1).trim();
  }
  let pos = end + 4;
  let body;
  if (/chunked/i.test(headers['transfer-encoding'] || '')) {
    const parts = [];
    for (;;) {
      const eol = buf.indexOf('\r\n', pos);
      if (eol < 0) return null;
      const size = parseInt(buf.subarray(pos, eol).toString('latin1'), 16);
      if (Number.isNaN(size)) throw new Error('bad chunk size from the Runtime API');
      pos = eol + 2;
      if (size === 0) {
        const tEnd = buf.indexOf('\r\n\r\n', pos - 2);
        if (tEnd < 0) return null;
        pos = tEnd + 4;
        break;
      }
      if (buf.length < pos + size + 2) return null;
      parts.push(buf.subarray(pos, pos + size));
      pos += size + 2;
    }
    body = Buffer.concat(parts);
  } else {
    const n = Number(headers['content-length'] || 0);
    if (buf.length < pos + n) return null;
    body = buf.subarray(pos, pos + n);
    pos += n;
  }
  const close = /close/i.test(headers.connection || '');
  return { status, headers, body: Buffer.from(body), consumed: pos, close };
}

// ------------------------------------------------------------ handler loading

class RuntimeError extends Error {
  constructor(type, message) {
    super(message);
    this.name = type;
  }
}

/** Split _HANDLER as AWS does: "dir/sub/module.a.b" -> ["dir/sub/", "module", "a.b"]. */
function splitHandler(full) {
  if (full.includes('..')) {
    throw new RuntimeError('Runtime.MalformedHandlerName',
      `'${full}' is not a valid handler name`);
  }
  const moduleAndHandler = path.basename(full);
  const moduleRoot = full.substring(0, full.indexOf(moduleAndHandler));
  const m = moduleAndHandler.match(/^([^.]*)\.(.*)$/);
  if (!m) throw new RuntimeError('Runtime.MalformedHandlerName', 'Bad handler');
  return [moduleRoot, m[1], m[2]];
}

function loadHandler(taskRoot, full) {
  const [moduleRoot, mod, propPath] = splitHandler(full);
  const base = path.resolve(taskRoot, moduleRoot, mod);
  let userApp;
  for (const ext of ['', '.js', '.cjs']) {
    if (fs.existsSync(base + ext) && fs.statSync(base + ext).isFile()) {
      userApp = require(base + ext); // absolute path: what the agent hooks
      break;
    }
  }
  if (userApp === undefined) {
    throw new RuntimeError('Runtime.ImportModuleError',
      `Error: Cannot find module '${mod}' in ${path.dirname(base)} (ESM is not supported here)`);
  }
  const fn = propPath.split('.').reduce((o, k) => o && o[k], userApp);
  if (!fn) throw new RuntimeError('Runtime.HandlerNotFound', `${full} is undefined or not exported`);
  if (typeof fn !== 'function') {
    throw new RuntimeError('Runtime.HandlerNotFound', `${full} is not a function`);
  }
  return fn;
}

// ------------------------------------------------------------ the loop

function errorBody(err) {
  const e = err instanceof Error ? err : new Error(String(err));
  return {
    errorType: e.name || 'Error',
    errorMessage: e.message,
    trace: typeof e.stack === 'string' ? e.stack.split('\n') : [],
  };
}

const client = new RuntimeApiClient(process.env.AWS_LAMBDA_RUNTIME_API || '127.0.0.1:9001');
let beforeExitListener = () => {};
let currentRequestId = null; // the invocation the handler is running, if any
let exiting = false;

async function postInvocationError(requestId, err) {
  const body = errorBody(err);
  await client.request('POST', `${API_PREFIX}/invocation/${requestId}/error`,
    JSON.stringify(body), {
      'Content-Type': 'application/json',
      'Lambda-Runtime-Function-Error-Type': body.errorType,
    });
}

async function postInitError(err) {
  const body = errorBody(err);
  await client.request('POST', `${API_PREFIX}/init/error`, JSON.stringify(body), {
    'Content-Type': 'application/json',
    'Lambda-Runtime-Function-Error-Type': body.errorType,
  });
}

/** Report a fatal error (for the running invocation, or init), then exit. */
function fatal(err, code, what) {
  if (exiting) return;
  exiting = true;
  diag(`${what}: ${err && err.stack ? err.stack : err}`);
  const rid = currentRequestId;
  const post = rid ? postInvocationError(rid, err) : postInitError(err);
  post.catch((e) => diag('could not report the error: ' + e.message))
    .finally(() => process.exit(code));
}

function buildContext(headers, requestId, next) {
  let finished = false;
  let waitForEmptyEventLoop = true;
  const once = (fn) => function (...args) {
    if (finished) return;
    finished = true;
    fn(...args);
  };
  const complete = (result) => {
    currentRequestId = null;
    const body = JSON.stringify(result === undefined ? null : result);
    client.request('POST', `${API_PREFIX}/invocation/${requestId}/response`, body,
      { 'Content-Type': 'application/json' })
      .then(next, (e) => { diag('posting the response failed: ' + e.message); next(); });
  };
  const failWith = (err) => {
    currentRequestId = null;
    diag(`invocation ${requestId} failed: ${err && err.stack ? err.stack : err}`);
    postInvocationError(requestId, err)
      .then(next, (e) => { diag('posting the error failed: ' + e.message); next(); });
  };
  const done = (err, result) => {
    beforeExitListener = () => {};
    if (err !== undefined && err !== null) failWith(err);
    else complete(result);
  };
  const callback = (err, result) => {
    beforeExitListener = () => {};
    if (err !== undefined && err !== null) {
      failWith(err);
    } else if (!waitForEmptyEventLoop) {
      complete(result);
    } else {
      beforeExitListener = () => setImmediate(() => complete(result));
    }
  };
  const deadline = Number(headers['lambda-runtime-deadline-ms']);
  let clientContext;
  let identity;
  try {
    if (headers['lambda-runtime-client-context']) {
      clientContext = JSON.parse(headers['lambda-runtime-client-context']);
    }
    if (headers['lambda-runtime-cognito-identity']) {
      identity = JSON.parse(headers['lambda-runtime-cognito-identity']);
    }
  } catch (e) {
    diag('bad client context / identity header: ' + e.message);
  }
  const context = {
    get callbackWaitsForEmptyEventLoop() { return waitForEmptyEventLoop; },
    set callbackWaitsForEmptyEventLoop(v) { waitForEmptyEventLoop = v; },
    succeed: once((result) => done(null, result)),
    fail: once((err) => done(err === undefined || err === null ? 'handled' : err)),
    done: once(done),
    functionName: process.env.AWS_LAMBDA_FUNCTION_NAME,
    functionVersion: process.env.AWS_LAMBDA_FUNCTION_VERSION,
    memoryLimitInMB: process.env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
    logGroupName: process.env.AWS_LAMBDA_LOG_GROUP_NAME,
    logStreamName: process.env.AWS_LAMBDA_LOG_STREAM_NAME,
    invokedFunctionArn: headers['lambda-runtime-invoked-function-arn'],
    awsRequestId: requestId,
    clientContext,
    identity,
    getRemainingTimeInMillis: () => Math.max(0, deadline - Date.now()),
  };
  return [once(callback), context, once(done)];
}

async function handleOne(handler, isAsync, next) {
  const res = await client.request('GET', `${API_PREFIX}/invocation/next`);
  if (res.status !== 200) {
    throw new Error(`GET invocation/next answered ${res.status}: ${res.body.toString()}`);
  }
  const requestId = res.headers['lambda-runtime-aws-request-id'];
  if (res.headers['lambda-runtime-trace-id']) {
    process.env._X_AMZN_TRACE_ID = res.headers['lambda-runtime-trace-id'];
  } else {
    delete process.env._X_AMZN_TRACE_ID;
  }
  currentRequestId = requestId;
  const [callback, context, rawDone] = buildContext(res.headers, requestId, next);
  // Nothing answered and the loop ran dry: AWS posts an error for an async
  // handler, a null response for a callback one (bypassing the context
  // methods the agent wrapped).
  beforeExitListener = () => {
    beforeExitListener = () => {};
    if (isAsync) {
      rawDone(new RuntimeError('Runtime.NodeJsExit',
        'Runtime exited without providing a reason'));
    } else {
      rawDone(null, null);
    }
  };
  let event;
  try {
    event = JSON.parse(res.body.toString('utf8') || 'null');
  } catch (err) {
    callback(err);
    return;
  }
  try {
    const result = handler(event, context, callback);
    if (result && typeof result.then === 'function') {
      // Read context.succeed/fail now, not earlier: the agent's wrapper
      // replaced them while the handler started.
      result.then((v) => context.succeed(v), (e) => context.fail(e))
        .catch((e) => context.fail(e));
    }
  } catch (err) {
    callback(err);
  }
}

function main() {
  process.on('uncaughtException', (err) => fatal(err, 129, 'uncaught exception'));
  process.on('unhandledRejection', (reason) => {
    const err = reason instanceof Error ? reason : new Error(String(reason));
    err.name = 'Runtime.UnhandledPromiseRejection';
    fatal(err, 128, 'unhandled rejection');
  });
  process.on('beforeExit', () => beforeExitListener());

  let handler;
  try {
    handler = loadHandler(process.env.LAMBDA_TASK_ROOT || process.cwd(),
      process.env._HANDLER || 'index.handler');
  } catch (err) {
    fatal(err, 129, 'init error');
    return;
  }
  const isAsync = handler.constructor && handler.constructor.name === 'AsyncFunction';
  diag(`handler ${process.env._HANDLER} loaded (${handler.name || 'anonymous'}` +
    `${isAsync ? ', async' : ''})`);

  const loop = () => {
    setImmediate(() => {
      handleOne(handler, isAsync, loop).catch((err) => fatal(err, 1, 'runtime loop'));
    });
  };
  loop();
}

main();
