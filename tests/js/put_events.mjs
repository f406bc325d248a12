// PutProjectEvents with the AWS SDK for JavaScript v3, as an application would call it.
// stdin: a JSON list of calls {endpoint, region, accessKeyId, secretAccessKey, project, events,
// clockOffsetMs}; stdout: one JSON list of results {status, errorType, message, failedEventCount}.
import { EvidentlyClient, PutProjectEventsCommand } from "@aws-sdk/client-evidently";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const calls = JSON.parse(Buffer.concat(chunks).toString());

const results = [];
for (const call of calls) {
  const client = new EvidentlyClient({
    region: call.region,
    endpoint: call.endpoint,
    credentials: { accessKeyId: call.accessKeyId, secretAccessKey: call.secretAccessKey },
    maxAttempts: 1,
    // Without this the SDK sends to dataplane.<endpoint host>, as botocore without inject_host_prefix=False.
    disableHostPrefix: true,
    // A negative offset signs as if the request had been made that long ago.
    systemClockOffset: call.clockOffsetMs ?? 0,
  });
  const events = call.events.map((e) => ({ ...e, timestamp: new Date(e.timestamp * 1000) }));
  try {
    const out = await client.send(new PutProjectEventsCommand({ project: call.project, events }));
    results.push({ status: out.$metadata.httpStatusCode, failedEventCount: out.failedEventCount });
  } catch (err) {
    results.push({ status: err.$metadata?.httpStatusCode ?? null, errorType: err.name, message: err.message });
  }
  client.destroy();
}
process.stdout.write(JSON.stringify(results) + "\n");
