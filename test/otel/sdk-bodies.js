/*
 * Real OTLP export bodies from the pinned OpenTelemetry JS SDK, for
 * test/fakes/test_fake_apm.py (the fake APM server's protobuf and JSON readers
 * against the SDK's own serializers):
 *
 *   node test/otel/sdk-bodies.js   ->  one JSON object on stdout:
 *   {"traces":  {"protobuf": <base64>, "json": <base64>, "expect": [{span_id, trace_id,
 *                parent_id, name, kind, attributes}...]},
 *    "metrics": {..., "expect": [{name, value}...]},
 *    "logs":    {..., "expect": [{body, trace_id, span_id, severity_text}...]},
 *    "service": <service.name of the resource>}
 *
 * The spans, metrics and log records are made with the SDK (in-memory
 * exporters) and serialized with @opentelemetry/otlp-transformer, the code
 * the OTLP exporters use.
 */
'use strict';

const api = require('@opentelemetry/api');
const { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } =
  require('@opentelemetry/sdk-trace-base');
const { MeterProvider, InMemoryMetricExporter, PeriodicExportingMetricReader,
  AggregationTemporality } = require('@opentelemetry/sdk-metrics');
const { LoggerProvider, InMemoryLogRecordExporter, SimpleLogRecordProcessor } =
  require('@opentelemetry/sdk-logs');
const { resourceFromAttributes } = require('@opentelemetry/resources');
const t = require('@opentelemetry/otlp-transformer');

const SERVICE = 'sdk-bodies-service';

async function main() {
  const resource = resourceFromAttributes({ 'service.name': SERVICE, 'deployment.id': 7 });

  const spanExporter = new InMemorySpanExporter();
  const tp = new BasicTracerProvider({ resource,
    spanProcessors: [new SimpleSpanProcessor(spanExporter)] });
  const tracer = tp.getTracer('sdk-bodies', '1.2.3');
  const root = tracer.startSpan('root ünïcode', { kind: api.SpanKind.SERVER,
    attributes: { 's': 'text', 'i': 42, 'neg': -5, 'd': 1.5, 'b': true, 'arr': ['x', 'y'] } });
  const ctx = api.trace.setSpan(api.ROOT_CONTEXT, root);
  const child = tracer.startSpan('child', { kind: api.SpanKind.CLIENT }, ctx);
  child.addEvent('an event', { 'k': 'v' });
  child.setStatus({ code: api.SpanStatusCode.ERROR, message: 'bad' });
  child.end();
  root.end();
  await tp.forceFlush();
  const spans = spanExporter.getFinishedSpans();

  const logExporter = new InMemoryLogRecordExporter();
  const lp = new LoggerProvider({ resource,
    processors: [new SimpleLogRecordProcessor({ exporter: logExporter })] });
  lp.getLogger('sdk-bodies').emit({ severityText: 'WARN', severityNumber: 13,
    body: 'a log line', context: ctx });
  lp.getLogger('sdk-bodies').emit({ severityText: 'INFO', body: { structured: [1, 'two'] } });
  await lp.forceFlush();
  const records = logExporter.getFinishedLogRecords();

  const metricExporter = new InMemoryMetricExporter(AggregationTemporality.CUMULATIVE);
  const reader = new PeriodicExportingMetricReader({ exporter: metricExporter,
    exportIntervalMillis: 3600000 });
  const mp = new MeterProvider({ resource, readers: [reader] });
  const meter = mp.getMeter('sdk-bodies');
  meter.createCounter('bodies.count').add(3);
  meter.createHistogram('bodies.hist').record(2.5);
  meter.createUpDownCounter('bodies.updown').add(-4);
  await mp.forceFlush();
  const metrics = metricExporter.getMetrics();

  const b64 = (u8) => Buffer.from(u8).toString('base64');
  const out = {
    service: SERVICE,
    traces: {
      protobuf: b64(t.ProtobufTraceSerializer.serializeRequest(spans)),
      json: b64(t.JsonTraceSerializer.serializeRequest(spans)),
      expect: spans.map((s) => ({ span_id: s.spanContext().spanId,
        trace_id: s.spanContext().traceId,
        parent_id: s.parentSpanContext ? s.parentSpanContext.spanId : null,
        name: s.name, kind: s.kind + 1, status: s.status.code,
        attributes: s.attributes })),
    },
    logs: {
      protobuf: b64(t.ProtobufLogsSerializer.serializeRequest(records)),
      json: b64(t.JsonLogsSerializer.serializeRequest(records)),
      expect: records.map((r) => ({ body: r.body, severity_text: r.severityText,
        trace_id: r.spanContext ? r.spanContext.traceId : null,
        span_id: r.spanContext ? r.spanContext.spanId : null })),
    },
    metrics: {
      protobuf: b64(t.ProtobufMetricsSerializer.serializeRequest(metrics[metrics.length - 1])),
      json: b64(t.JsonMetricsSerializer.serializeRequest(metrics[metrics.length - 1])),
      expect: [{ name: 'bodies.count', value: 3 }, { name: 'bodies.hist', count: 1, sum: 2.5 },
        { name: 'bodies.updown', value: -4 }],
    },
  };
  process.stdout.write(JSON.stringify(out) + '\n');
  await Promise.all([tp.shutdown(), lp.shutdown(), mp.shutdown()]);
}

main().catch((e) => {
  process.stderr.write(String(e && e.stack ? e.stack : e) + '\n');
  process.exit(1);
});
