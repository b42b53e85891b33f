/*
 * OpenTelemetry set-up for a Lambda function, loaded before the runtime with
 * NODE_OPTIONS="-r <this file>": the "lambda-wrapper" that
 * @opentelemetry/instrumentation-aws-lambda's README describes, written with
 * the SDK's building blocks (no sdk-node), as a user of apm-ext would.
 *
 * - Traces: NodeTracerProvider + BatchSpanProcessor + an OTLP/HTTP exporter.
 * - Metrics: MeterProvider + PeriodicExportingMetricReader (a day's interval:
 *   the aws-lambda instrumentation's force-flush at the end of each
 *   invocation is what exports them).
 * - Logs: LoggerProvider + BatchLogRecordProcessor (the instrumentation does
 *   not flush logs: the handler does, see flushLogs()).
 * - AwsLambdaInstrumentation, registered here, before the runtime requires
 *   the handler module (it hooks LAMBDA_TASK_ROOT/<_HANDLER module>.js); its
 *   wrapper force-flushes traces and metrics before the handler's result goes
 *   to the runtime.
 *
 * The JS SDK has one exporter package per protocol, so the protocol variable
 * picks the package:
 *   OTEL_EXPORTER_OTLP_PROTOCOL  http/protobuf (default): exporter-*-otlp-proto
 *                                http/json: exporter-*-otlp-http
 *   OTEL_EXPORTER_OTLP_ENDPOINT  read by the exporters themselves (+ /v1/<signal>)
 *   OTEL_EXPORTER_OTLP_COMPRESSION  gzip | none, read by the exporters
 *   OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES  read by the env detector
 *   APM_TEST_OTEL_SIGNALS        comma list of traces,metrics,logs (default all)
 *   APM_TEST_OTEL_LAMBDA         off: do not register the aws-lambda instrumentation
 *   OTEL_LOG_LEVEL               the SDK's diagnostics (default warn): each
 *                                line on stderr starts "otel-diag: <level> "
 *
 * Exports {tracerProvider, meterProvider, loggerProvider, protocol,
 * flushAll(), flushLogs()} for the handler (require('./otel-init')).
 */
'use strict';

const api = require('@opentelemetry/api');
const { logs } = require('@opentelemetry/api-logs');
const { NodeTracerProvider } = require('@opentelemetry/sdk-trace-node');
const { BatchSpanProcessor } = require('@opentelemetry/sdk-trace-base');
const { MeterProvider, PeriodicExportingMetricReader } = require('@opentelemetry/sdk-metrics');
const { LoggerProvider, BatchLogRecordProcessor } = require('@opentelemetry/sdk-logs');
const { defaultResource, detectResources, envDetector } = require('@opentelemetry/resources');
const { registerInstrumentations } = require('@opentelemetry/instrumentation');
const { AwsLambdaInstrumentation } = require('@opentelemetry/instrumentation-aws-lambda');

const LEVELS = { none: 'NONE', error: 'ERROR', warn: 'WARN', info: 'INFO', debug: 'DEBUG',
  verbose: 'VERBOSE', all: 'ALL' };

function diagLine(level) {
  return (...args) => {
    const text = args.map((a) => (a instanceof Error ? a.stack || a.message
      : typeof a === 'string' ? a : safeJson(a))).join(' ');
    process.stderr.write(`otel-diag: ${level} ${text.replace(/\n/g, '\\n')}\n`);
  };
}

function safeJson(v) {
  try {
    return JSON.stringify(v);
  } catch (e) {
    return String(v);
  }
}

const level = LEVELS[(process.env.OTEL_LOG_LEVEL || 'warn').toLowerCase()] || 'WARN';
api.diag.setLogger({
  error: diagLine('error'), warn: diagLine('warn'), info: diagLine('info'),
  debug: diagLine('debug'), verbose: diagLine('verbose'),
}, api.DiagLogLevel[level]);

const protocol = (process.env.OTEL_EXPORTER_OTLP_PROTOCOL || 'http/protobuf').trim();
let pkg;
if (protocol === 'http/protobuf') {
  pkg = 'proto';
} else if (protocol === 'http/json') {
  pkg = 'http';
} else {
  throw new Error(`otel-init: OTEL_EXPORTER_OTLP_PROTOCOL=${protocol} is not supported ` +
    'here (http/protobuf or http/json; apm-ext takes OTLP/HTTP only)');
}
const { OTLPTraceExporter } = require(`@opentelemetry/exporter-trace-otlp-${pkg}`);
const { OTLPMetricExporter } = require(`@opentelemetry/exporter-metrics-otlp-${pkg}`);
const { OTLPLogExporter } = require(`@opentelemetry/exporter-logs-otlp-${pkg}`);

const signals = new Set((process.env.APM_TEST_OTEL_SIGNALS || 'traces,metrics,logs')
  .split(',').map((s) => s.trim()).filter(Boolean));

const resource = defaultResource().merge(detectResources({ detectors: [envDetector] }));

let tracerProvider = null;
let meterProvider = null;
let loggerProvider = null;

if (signals.has('traces')) {
  tracerProvider = new NodeTracerProvider({
    resource,
    spanProcessors: [new BatchSpanProcessor(new OTLPTraceExporter())],
  });
  tracerProvider.register();
}
if (signals.has('metrics')) {
  meterProvider = new MeterProvider({
    resource,
    readers: [new PeriodicExportingMetricReader({
      exporter: new OTLPMetricExporter(),
      exportIntervalMillis: 24 * 3600 * 1000,
      exportTimeoutMillis: 10000,
    })],
  });
  api.metrics.setGlobalMeterProvider(meterProvider);
}
if (signals.has('logs')) {
  loggerProvider = new LoggerProvider({
    resource,
    processors: [new BatchLogRecordProcessor({ exporter: new OTLPLogExporter() })],
  });
  logs.setGlobalLoggerProvider(loggerProvider);
}

// APM_TEST_OTEL_LAMBDA=off: no aws-lambda instrumentation (test/otel/both.js,
// where the Elastic agent wraps the handler: two wrappers cannot both patch the
// same export, the second one fails with "Cannot redefine property").
if ((process.env.APM_TEST_OTEL_LAMBDA || 'on') !== 'off') {
  registerInstrumentations({
    tracerProvider: tracerProvider || undefined,
    meterProvider: meterProvider || undefined,
    instrumentations: [new AwsLambdaInstrumentation()],
  });
}

async function flushLogs() {
  if (loggerProvider) await loggerProvider.forceFlush();
}

/** Everything the SDK holds, exported now (before a crash or a long sleep). */
async function flushAll() {
  await Promise.all([tracerProvider && tracerProvider.forceFlush(),
    meterProvider && meterProvider.forceFlush(), flushLogs()]);
}

module.exports = { tracerProvider, meterProvider, loggerProvider, protocol, flushAll,
  flushLogs };
