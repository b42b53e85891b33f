/*
 * fuzz_telemetry.c - libFuzzer target: apm_tel_record_parse on the tokens
 * of apm_json_parse (the whole input as one record, and each element when
 * it is a batch), apm_lambda_event_parse and apm_time_parse, each given
 * the whole input.
 *
 * Invariants: parsed records and events have their strings terminated
 * within their arrays and their views inside the input; an INVOKE has a
 * request id; a parsed time is a real calendar date and agrees with
 * timegm(3).
 */
#include "../../apm-ext.h"
#include "fuzz.h"

#define TOKENS 2048 /* as many as the extension gives one record */
static struct apm_json_tok t[TOKENS];

static void
check_record(const char *js, size_t size, const struct apm_json_tok *rt,
    int n)
{
	struct apm_tel_record r;
	int ret = apm_tel_record_parse(js, rt, n, &r);
	FUZZ_ASSERT(ret == 0 || ret == -1);
	if (ret < 0)
		return;
	FUZZ_ASSERT(rt[0].type == APM_JSON_OBJECT);
	FUZZ_ASSERT(r.type >= APM_TEL_OTHER && r.type <= APM_TEL_LOGS_DROPPED);
	FUZZ_ASSERT(strnlen(r.request_id, sizeof r.request_id) <
	    sizeof r.request_id);
	FUZZ_ASSERT(strnlen(r.status, sizeof r.status) < sizeof r.status);
	FUZZ_ASSERT(r.has_init == 0 || r.has_init == 1);
	if (r.type == APM_TEL_FUNCTION) {
		FUZZ_ASSERT(r.log.ptr >= js && r.log.ptr + r.log.len <= js + size);
		FUZZ_ASSERT(r.log_is_string == 0 || r.log_is_string == 1);
	}
	/* "time", when a string that parses, is what apm_time_parse says */
	int tm = apm_json_get(js, rt, n, 0, "time");
	int64_t us;
	if (tm >= 0 && rt[tm].type == APM_JSON_STRING &&
	    apm_time_parse(js + rt[tm].start, rt[tm].end - rt[tm].start, &us) == 0)
		FUZZ_ASSERT(r.time_us == us);
}

static void
check_event(const char *js, size_t size)
{
	struct apm_lambda_event ev;
	if (apm_lambda_event_parse(js, size, &ev) < 0)
		return;
	FUZZ_ASSERT(ev.type >= APM_EV_UNKNOWN && ev.type <= APM_EV_SHUTDOWN);
	FUZZ_ASSERT(strnlen(ev.request_id, sizeof ev.request_id) <
	    sizeof ev.request_id);
	FUZZ_ASSERT(strnlen(ev.function_arn, sizeof ev.function_arn) <
	    sizeof ev.function_arn);
	FUZZ_ASSERT(strnlen(ev.trace, sizeof ev.trace) < sizeof ev.trace);
	size_t rl = strnlen(ev.shutdown_reason, sizeof ev.shutdown_reason);
	FUZZ_ASSERT(rl < sizeof ev.shutdown_reason);
	for (size_t i = 0; i < rl; i++)
		FUZZ_ASSERT(ev.shutdown_reason[i] < 'A' ||
		    ev.shutdown_reason[i] > 'Z');
	if (ev.type == APM_EV_INVOKE)
		FUZZ_ASSERT(ev.request_id[0] != 0);
}

static int
num(const char *s, int n)
{
	int v = 0;
	for (int i = 0; i < n; i++)
		v = v * 10 + (s[i] - '0');
	return v;
}

/* A time that parsed: check it against its own fields and timegm(3). */
static void
check_time(const char *s, size_t n)
{
	static const int mdays[] = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31,
		30, 31 };
	int64_t us;
	if (apm_time_parse(s, n, &us) < 0)
		return;
	FUZZ_ASSERT(n >= 20);
	int y = num(s, 4), mo = num(s + 5, 2), d = num(s + 8, 2);
	int leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
	FUZZ_ASSERT(mo >= 1 && mo <= 12 && d >= 1);
	FUZZ_ASSERT(d <= mdays[mo - 1] + (mo == 2 && leap));
	struct tm tm = { 0 };
	tm.tm_year = y - 1900;
	tm.tm_mon = mo - 1;
	tm.tm_mday = d;
	tm.tm_hour = num(s + 11, 2);
	tm.tm_min = num(s + 14, 2);
	tm.tm_sec = num(s + 17, 2);
	int64_t want = (int64_t)timegm(&tm) * 1000000;
	size_t i = 19;
	if (s[i] == '.') {
		int64_t frac = 0;
		int nd = 0;
		for (i++; i < n && s[i] >= '0' && s[i] <= '9'; i++, nd++)
			if (nd < 6)
				frac = frac * 10 + (s[i] - '0');
		for (; nd < 6; nd++)
			frac *= 10;
		want += frac;
	}
	if (s[i] == '+' || s[i] == '-') {
		FUZZ_ASSERT(i + 6 == n);
		int64_t off = num(s + i + 1, 2) * 60 + num(s + i + 4, 2);
		want -= (s[i] == '+' ? off : -off) * 60 * 1000000;
	} else {
		FUZZ_ASSERT((s[i] == 'Z' || s[i] == 'z') && i + 1 == n);
	}
	FUZZ_ASSERT(us == want);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *js = (const char *)data;
	int n = apm_json_parse(js, size, t, TOKENS, NULL, NULL);
	if (n > 0) {
		check_record(js, size, t, n);
		/* a batch: each element on its own, as tel_body hands them */
		if (t[0].type == APM_JSON_ARRAY)
			for (int j = 1; j < n; j = apm_json_skip(t, n, j))
				check_record(js, size, t + j, apm_json_skip(t, n, j) - j);
	}
	check_event(js, size);
	check_time(js, size);
	return 0;
}
