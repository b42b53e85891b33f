/*
 * The SigV4 signer (apm_sigv4_* in apm-ext.c) against published expected
 * values: for each case, a request is parsed, signed with AWS's example
 * credentials (AKIDEXAMPLE, 20150830T123600Z) and the canonical request, the
 * string to sign and the Authorization value are compared byte for byte with
 * the published ones.
 *
 * 1. Always: the cases embedded below (needs nothing but this file). Their
 *    expected values are published facts: AWS's documentation example for
 *    IAM ListUsers, and cases of AWS's Signature Version 4 test suite; and
 *    one case of ours, its canonical request only, by AWS's documented rule
 *    that a query parameter without a value signs as "name=" (not in the
 *    suite).
 * 2. When it is present: that whole test suite. It was published by AWS, and
 *    botocore ships it as tests/unit/auth/aws4_testsuite: one folder per
 *    case (some grouped in sub-folders), NAME/NAME.req (the request) with
 *    NAME.creq, NAME.sts and NAME.authz (the expected values). Its folder is
 *    $AWS_SIGV4_TESTSUITE or, when that is unset or empty,
 *    <repo>/../shared/aws-sigv4-testsuite if that folder exists; <repo> is
 *    the folder above this program's own when it holds apm-ext.h
 *    (build/sigv4), else the current directory (make test runs from the
 *    repository root). A folder that does not exist counts as absent: one
 *    line says so and the suite counts as one skipped item.
 *
 * 3. Always: where the signer stops (limits(): output buffers, path
 *    segments, query parameters, headers, a short x-amz-date): refused,
 *    never signed truncated.
 *
 * Last line: "N passed, N failed", with ", 1 skipped" when the suite was
 * absent.
 */
#include <dirent.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "apm-ext.h"

#define ACCESS_KEY "AKIDEXAMPLE"
#define SECRET_KEY "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
#define AMZ_DATE "20150830T123600Z"
#define MAX_HEADERS 64

struct sigv4_case {
	const char *name;
	const char *region, *service; /* NULL: the suite's "us-east-1", "service" */
	const char *session_token;    /* NULL: none for the signer to add */
	const char *req;              /* the request, in the suite's .req format:
	                                 request line, headers (a line starting
	                                 with white space continues the previous
	                                 value), blank line, body; LF line ends */
	const char *creq, *sts, *authz; /* expected; NULL: not checked */
};

/*
 * Embedded cases. The first is AWS's documentation example of the signing
 * process (GET https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08,
 * service iam). The others are cases of AWS's test suite (names as there),
 * chosen for what apm-ext signs and what a signer gets wrong: POST, a body,
 * query order and encoding, UTF-8 and spaces in the path, header trimming and
 * folding, a session token added by the signer or sent as a header.
 */
static const struct sigv4_case embedded[] = {
	{ "aws-docs/iam-list-users", "us-east-1", "iam", NULL,
	    "GET /?Action=ListUsers&Version=2010-05-08 HTTP/1.1\n"
	    "Host:iam.amazonaws.com\n"
	    "Content-Type:application/x-www-form-urlencoded; charset=utf-8\n"
	    "X-Amz-Date:20150830T123600Z",
	    "GET\n"
	    "/\n"
	    "Action=ListUsers&Version=2010-05-08\n"
	    "content-type:application/x-www-form-urlencoded; charset=utf-8\n"
	    "host:iam.amazonaws.com\n"
	    "x-amz-date:20150830T123600Z\n"
	    "\n"
	    "content-type;host;x-amz-date\n"
	    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	    "AWS4-HMAC-SHA256\n"
	    "20150830T123600Z\n"
	    "20150830/us-east-1/iam/aws4_request\n"
	    "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59",
	    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, "
	    "SignedHeaders=content-type;host;x-amz-date, "
	    "Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7" },
	{ "get-vanilla", NULL, NULL, NULL,
	    "GET / HTTP/1.1\n"
	    "Host:example.amazonaws.com\n"
	    "X-Amz-Date:20150830T123600Z",
	    "GET\n"
	    "/\n"
	    "\n"
	    "host:example.amazonaws.com\n"
	    "x-amz-date:20150830T123600Z\n"
	    "\n"
	    "host;x-amz-date\n"
	    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	    "AWS4-HMAC-SHA256\n"
	    "20150830T123600Z\n"
	    "20150830/us-east-1/service/aws4_request\n"
	    "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63",
	    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
	    "SignedHeaders=host;x-amz-date, "
	    "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31" },
	{ "post-vanilla", NULL, NULL, NULL,
	    "POST / HTTP/1.1\n"
	    "Host:example.amazonaws.com\n"
	    "X-Amz-Date:20150830T123600Z",
	    "POST\n"
	    "/\n"
	    "\n"
	    "host:example.amazonaws.com\n"
	    "x-amz-date:20150830T123600Z\n"
	    "\n"
	    "host;x-amz-date\n"
	    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	    "AWS4-HMAC-SHA256\n"
	    "20150830T123600Z\n"
	    "20150830/us-east-1/service/aws4_request\n"
	    "553f88c9e4d10fc9e109e2aeb65f030801b70c2f6468faca261d401ae622fc87",
	    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
	    "SignedHeaders=host;x-amz-date, "
	    "Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b" },
	{ "get-vanilla-query-order-key-case", NULL, NULL, NULL,
	    "GET /?Param2=value2&Param1=value1 HTTP/1.1\n"
	    "Host:example.amazonaws.com\n"
	    "X-Amz-Date:20150830T123600Z",
	    "GET\n"
	    "/\n"
	    "Param1=value1&Param2=value2\n"
	    "host:example.amazonaws.com\n"
	    "x-amz-date:20150830T123600Z\n"
	    "\n"
	    "host;x-amz-date\n"
	    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	    "AWS4-HMAC-SHA256\n"
	    "20150830T123600Z\n"
	    "20150830/us-east-1/service/aws4_request\n"
	    "816cd5b414d056048ba4f7c5386d6e0533120fb1fcfa93762cf0fc39e2cf19e0",
	    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
	    "SignedHeaders=host;x-amz-date, "
	    "Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500" },
	{ "get-vanilla-query-order-encoded", NULL, NULL, NULL,
	    "GET /?Param-3=Value3&Param=Value2&%E1%88%B4=Value1 HTTP/1.1\n"
	    "Host:example.amazonaws.com\n"
	    "X-Amz-Date:20150830T123600Z\n",
	    "GET\n"
	    "/\n"
	    "%E1%88%B4=Value1&Param=Value2&Param-3=Value3\n"
	    "host:example.amazonaws.com\n"
	    "x-amz-date:20150830T123600Z\n"
	    "\n"
	    "host;x-amz-date\n"
	    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	    "AWS4-HMAC-SHA256\n"
	    "20150830T123600Z\n"
	    "20150830/us-east-1/service/aws4_request\n"
	    "868294f5c38bd141c4972a373a76654f1418a8e4fc18b2e7903ae45e8ae0ec71",
	    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
	    "SignedHeaders=host;x-amz-date, "
	    "Signature=371d3713e185cc334048618a97f809c9ffe339c62934c032af5a0e595648fcac" },
	{ "get-vanilla-query-unreserved", NULL, NULL, NULL,
	    "GET /?-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqr"
	    "stuvwxyz=-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz HTTP/1.1\n"
	    "Host:example.amazonaws.com\n"
	    "X-Amz-Date:20150830T123600Z",
	    "GET\n"
	    "/\n"
	    "-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwx"
	    "yz=-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\n"
	    "host:example.amazonaws.com\n"
	    "x-amz-date:20150830T123600Z\n"
	    "\n"
	    "host;x-amz-date\n"
	    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	    "AWS4-HMAC-SHA256\n"
	    "20150830T123600Z\n"
	    "20150830/us-east-1/service/aws4_request\n"
	    "c30d4703d9f799439be92736156d47ccfb2d879ddf56f5befa6d1d6aab979177",
	    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
	    "SignedHeaders=host;x-amz-date, "
	    "Signature=9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197" },
	{ "get-utf8", NULL, NULL, NULL,
	    "GET /\xe1\x88\xb4 HTTP/1.1\n"
	    "Host:example.amazonaws.com\n"
	    "X-Amz-Date:20150830T123600Z",
	    "GET\n"
	    "/%E1%88%B4\n"
	    "\n"
	    "host:example.amazonaws.com\n"
	    "x-amz-date:20150830T123600Z\n"
	    "\n"
	    "host;x-amz-date\n"
	    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	    "AWS4-HMAC-SHA256\n"
	    "20150830T123600Z\n"
	    "20150830/us-east-1/service/aws4_request\n"
	    "2a0a97d02205e45ce2e994789806b19270cfbbb0921b278ccf58f5249ac42102",
	    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
	    "SignedHeaders=host;x-amz-date, "
	    "Signature=8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85" },
	{ "normalize-path/get-space", NULL, NULL, NULL,
	    "GET /example space/ HTTP/1.1\n"
	    "Host:example.amazonaws.com\n"
	    "X-Amz-Date:20150830T123600Z",
	    "GET\n"
	    "/example%20space/\n"
	    "\n"
	    "host:example.amazonaws.com\n"
	    "x-amz-date:20150830T123600Z\n"
	    "\n"
	    "host;x-amz-date\n"
	    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	    "AWS4-HMAC-SHA256\n"
	    "20150830T123600Z\n"
	    "20150830/us-east-1/service/aws4_request\n"
	    "63ee75631ed7234ae61b5f736dfc7754cdccfedbff4b5128a915706ee9390d86",
	    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
	    "SignedHeaders=host;x-amz-date, "
	    "Signature=652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741" },
	{ "get-header-value-trim", NULL, NULL, NULL,
	    "GET / HTTP/1.1\n"
	    "Host:example.amazonaws.com\n"
	    "My-Header1: value1\n"
	    "My-Header2: \"a   b   c\"\n"
	    "X-Amz-Date:20150830T123600Z",
	    "GET\n"
	    "/\n"
	    "\n"
	    "host:example.amazonaws.com\n"
	    "my-header1:value1\n"
	    "my-header2:\"a b c\"\n"
	    "x-amz-date:20150830T123600Z\n"
	    "\n"
	    "host;my-header1;my-header2;x-amz-date\n"
	    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	    "AWS4-HMAC-SHA256\n"
	    "20150830T123600Z\n"
	    "20150830/us-east-1/service/aws4_request\n"
	    "a726db9b0df21c14f559d0a978e563112acb1b9e05476f0a6a1c7d68f28605c7",
	    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
	    "SignedHeaders=host;my-header1;my-header2;x-amz-date, "
	    "Signature=acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736" },
	{ "get-header-value-multiline", NULL, NULL, NULL,
	    "GET / HTTP/1.1\n"
	    "Host:example.amazonaws.com\n"
	    "My-Header1:value1\n"
	    "  value2\n"
	    "     value3\n"
	    "X-Amz-Date:20150830T123600Z",
	    "GET\n"
	    "/\n"
	    "\n"
	    "host:example.amazonaws.com\n"
	    "my-header1:value1 value2 value3\n"
	    "x-amz-date:20150830T123600Z\n"
	    "\n"
	    "host;my-header1;x-amz-date\n"
	    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	    "AWS4-HMAC-SHA256\n"
	    "20150830T123600Z\n"
	    "20150830/us-east-1/service/aws4_request\n"
	    "e99419459a677bc11de234014be3c4e72c1ea5b454ceb58b613061f5d7a162e8",
	    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
	    "SignedHeaders=host;my-header1;x-amz-date, "
	    "Signature=cfd34249e4b1c8d6b91ef74165d41a32e5fab3306300901bb65a51a73575eefd" },
	{ "post-x-www-form-urlencoded", NULL, NULL, NULL,
	    "POST / HTTP/1.1\n"
	    "Content-Type:application/x-www-form-urlencoded\n"
	    "Host:example.amazonaws.com\n"
	    "X-Amz-Date:20150830T123600Z\n"
	    "\n"
	    "Param1=value1",
	    "POST\n"
	    "/\n"
	    "\n"
	    "content-type:application/x-www-form-urlencoded\n"
	    "host:example.amazonaws.com\n"
	    "x-amz-date:20150830T123600Z\n"
	    "\n"
	    "content-type;host;x-amz-date\n"
	    "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e",
	    "AWS4-HMAC-SHA256\n"
	    "20150830T123600Z\n"
	    "20150830/us-east-1/service/aws4_request\n"
	    "42a5e5bb34198acb3e84da4f085bb7927f2bc277ca766e6d19c73c2154021281",
	    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
	    "SignedHeaders=content-type;host;x-amz-date, "
	    "Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a" },
	{ "get-vanilla-with-session-token", NULL, NULL,
	    "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267",
	    "GET / HTTP/1.1\n"
	    "Host:example.amazonaws.com\n"
	    "X-Amz-Date:20150830T123600Z",
	    "GET\n"
	    "/\n"
	    "\n"
	    "host:example.amazonaws.com\n"
	    "x-amz-date:20150830T123600Z\n"
	    "x-amz-security-token:6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267\n"
	    "\n"
	    "host;x-amz-date;x-amz-security-token\n"
	    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	    "AWS4-HMAC-SHA256\n"
	    "20150830T123600Z\n"
	    "20150830/us-east-1/service/aws4_request\n"
	    "067b36aa60031588cea4a4cde1f21215227a047690c72247f1d70b32fbbfad2b",
	    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
	    "SignedHeaders=host;x-amz-date;x-amz-security-token, "
	    "Signature=07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8" },
	{ "post-sts-token/post-sts-header-before", NULL, NULL, NULL,
	    "POST / HTTP/1.1\n"
	    "Host:example.amazonaws.com\n"
	    "X-Amz-Date:20150830T123600Z\n"
	    "X-Amz-Security-Token:AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPB"
	    "SM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8"
	    "YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsbur"
	    "EDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo"
	    "0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9"
	    "KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==",
	    "POST\n"
	    "/\n"
	    "\n"
	    "host:example.amazonaws.com\n"
	    "x-amz-date:20150830T123600Z\n"
	    "x-amz-security-token:AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPB"
	    "SM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8"
	    "YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsbur"
	    "EDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo"
	    "0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9"
	    "KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==\n"
	    "\n"
	    "host;x-amz-date;x-amz-security-token\n"
	    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	    "AWS4-HMAC-SHA256\n"
	    "20150830T123600Z\n"
	    "20150830/us-east-1/service/aws4_request\n"
	    "c237e1b440d4c63c32ca95b5b99481081cb7b13c7e40434868e71567c1a882f6",
	    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
	    "SignedHeaders=host;x-amz-date;x-amz-security-token, "
	    "Signature=85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead" },
	/* not in AWS's suite: query parameters without a value, with and
	 * without '=' (S3's ?acl), sign as "name=" (the canonical request
	 * only: AWS's rule for it is what is checked) */
	{ "ours/query-params-without-value", NULL, NULL, NULL,
	    "GET /?b=2&acl&c= HTTP/1.1\n"
	    "Host:example.amazonaws.com\n"
	    "X-Amz-Date:20150830T123600Z",
	    "GET\n"
	    "/\n"
	    "acl=&b=2&c=\n"
	    "host:example.amazonaws.com\n"
	    "x-amz-date:20150830T123600Z\n"
	    "\n"
	    "host;x-amz-date\n"
	    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	    NULL, NULL },
};

struct tally {
	int passed, failed, skipped;
};

/* Sign c and compare each expected value it has (one check each). */
static void
run_case(const struct sigv4_case *c, struct tally *t)
{
	size_t len = strlen(c->req);
	char *req = malloc(len + 1);
	if (!req) {
		t->failed++, printf("FAIL %s: out of memory\n", c->name);
		return;
	}
	memcpy(req, c->req, len + 1);
	char *p = req, *end = req + len, *eol, *body = end;
	struct apm_http_header h[MAX_HEADERS];
	size_t nh = 0;
	const char *bad = NULL;

	/* request line: METHOD SP target SP version (the target may hold
	 * spaces: get-space) */
	eol = memchr(p, '\n', (size_t)(end - p));
	if (!eol)
		eol = end;
	*eol = 0;
	char *sp1 = strchr(p, ' '), *sp2 = strrchr(p, ' ');
	if (!sp1 || sp2 == sp1) {
		bad = "no METHOD target VERSION line";
		goto out;
	}
	*sp1 = *sp2 = 0;
	const char *method = p, *target = sp1 + 1;
	char *query = strchr(sp1 + 1, '?');
	if (query)
		*query++ = 0;
	p = eol < end ? eol + 1 : end;

	/* headers; a folded value keeps its line breaks (the request text is
	 * contiguous), the signer collapses them */
	while (p < end) {
		eol = memchr(p, '\n', (size_t)(end - p));
		if (!eol)
			eol = end;
		size_t n = (size_t)(eol - p);
		if (n > 0 && p[n - 1] == '\r')
			n--;
		if (n == 0) {
			body = eol < end ? eol + 1 : end;
			break;
		}
		if (*p == ' ' || *p == '\t') {
			if (nh == 0) {
				bad = "continuation line without a header";
				goto out;
			}
			h[nh - 1].value.len = (size_t)(p + n - h[nh - 1].value.ptr);
		} else {
			const char *colon = memchr(p, ':', n);
			if (!colon || nh == MAX_HEADERS) {
				bad = colon ? "too many headers" : "header line without ':'";
				goto out;
			}
			h[nh].name = (struct apm_str){ p, (size_t)(colon - p) };
			h[nh].value = (struct apm_str){ colon + 1, (size_t)(p + n - colon - 1) };
			nh++;
		}
		p = eol < end ? eol + 1 : end;
	}

	struct apm_sigv4 s = {
		.method = method, .path = target, .query = query ? query : "",
		.headers = h, .num_headers = nh,
		.payload = body, .payload_len = (size_t)(end - body),
		.region = c->region ? c->region : "us-east-1",
		.service = c->service ? c->service : "service",
		.amz_date = AMZ_DATE, .access_key = ACCESS_KEY,
		.secret_key = SECRET_KEY, .session_token = c->session_token,
	};
	const struct {
		const char *what, *want;
		int (*fn)(const struct apm_sigv4 *, char *, size_t);
	} parts[] = {
		{ "canonical request", c->creq, apm_sigv4_canonical },
		{ "string to sign", c->sts, apm_sigv4_string_to_sign },
		{ "Authorization", c->authz, apm_sigv4_authorization },
	};
	int checked = 0;
	for (size_t k = 0; k < sizeof parts / sizeof parts[0]; k++) {
		char got[8192];
		if (!parts[k].want)
			continue;
		checked++;
		int n = parts[k].fn(&s, got, sizeof got);
		if (n >= 0 && (size_t)n == strlen(got) && strcmp(got, parts[k].want) == 0) {
			t->passed++;
		} else {
			t->failed++;
			printf("FAIL %s: %s\n--- want\n%s\n--- got\n%s\n---\n", c->name,
			    parts[k].what, parts[k].want, n >= 0 ? got : "(error)");
		}
	}
	if (!checked)
		bad = "no expected value";
out:
	if (bad)
		t->failed++, printf("FAIL %s: %s\n", c->name, bad);
	free(req);
}

/* A whole file, NUL-terminated, or NULL. */
static char *
slurp(const char *path)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	size_t len = 0, cap = 4096;
	char *buf = malloc(cap);
	while (buf) {
		len += fread(buf + len, 1, cap - len - 1, f);
		if (len < cap - 1)
			break;
		char *more = realloc(buf, cap *= 2);
		if (!more)
			free(buf);
		buf = more;
	}
	if (buf && ferror(f)) {
		free(buf);
		buf = NULL;
	}
	fclose(f);
	if (buf)
		buf[len] = 0;
	return buf;
}

static char *
slurp_case(const char *dir, const char *name, const char *ext)
{
	char path[PATH_MAX + 512];
	if (snprintf(path, sizeof path, "%s/%s.%s", dir, name, ext) >= (int)sizeof path)
		return NULL;
	char *s = slurp(path);
	if (s && strcmp(ext, "req") != 0) { /* expected values: no final newline */
		size_t n = strlen(s);
		while (n && (s[n - 1] == '\n' || s[n - 1] == '\r'))
			s[--n] = 0;
	}
	return s;
}

/*
 * One case folder of the suite: 0 when it holds no NAME.req. The session
 * token a signer adds itself (get-vanilla-with-session-token) is not in the
 * .req: it is taken from the expected canonical request, when that signs
 * x-amz-security-token and the request does not carry one.
 */
static int
run_suite_case(const char *dir, const char *name, const char *rel, struct tally *t)
{
	char *req = slurp_case(dir, name, "req");
	if (!req)
		return 0;
	char *creq = slurp_case(dir, name, "creq");
	char *sts = slurp_case(dir, name, "sts");
	char *authz = slurp_case(dir, name, "authz");
	char *token = NULL;
	const char *tok = creq ? strstr(creq, "\nx-amz-security-token:") : NULL;
	if (tok && !strcasestr(req, "\nx-amz-security-token:")) {
		tok += strlen("\nx-amz-security-token:");
		token = strndup(tok, strcspn(tok, "\n"));
	}
	struct sigv4_case c = { rel, NULL, NULL, token, req, creq, sts, authz };
	run_case(&c, t);
	free(token);
	free(authz);
	free(sts);
	free(creq);
	free(req);
	return 1;
}

/* Every case under dir (rel: its path inside the suite). Returns the count. */
static int
walk(const char *dir, const char *rel, struct tally *t)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int cases = 0;
	if (!d)
		return 0;
	while ((e = readdir(d))) {
		char sub[PATH_MAX], subrel[PATH_MAX];
		struct stat st;
		if (e->d_name[0] == '.')
			continue;
		if (snprintf(sub, sizeof sub, "%s/%s", dir, e->d_name) >= (int)sizeof sub ||
		    snprintf(subrel, sizeof subrel, "%s%s%s", rel, *rel ? "/" : "",
		    e->d_name) >= (int)sizeof subrel)
			continue;
		if (stat(sub, &st) != 0 || !S_ISDIR(st.st_mode))
			continue;
		if (run_suite_case(sub, e->d_name, subrel, t))
			cases++;
		else
			cases += walk(sub, subrel, t);
	}
	closedir(d);
	return cases;
}

static int
is_dir(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* The suite's folder (see the top of this file) into buf. */
static const char *
suite_dir(char *buf, size_t cap)
{
	const char *env = getenv("AWS_SIGV4_TESTSUITE");
	if (env && *env)
		return env;
	char repo[PATH_MAX], probe[PATH_MAX + 16];
	ssize_t n = readlink("/proc/self/exe", repo, sizeof repo - 1);
	int found = 0;
	if (n > 0) {
		repo[n] = 0;
		for (int up = 0; up < 2; up++) { /* <repo>/build/sigv4 -> <repo> */
			char *slash = strrchr(repo, '/');
			if (slash)
				*slash = 0;
		}
		snprintf(probe, sizeof probe, "%s/apm-ext.h", repo);
		found = access(probe, F_OK) == 0;
	}
	if (!found && !getcwd(repo, sizeof repo))
		snprintf(repo, sizeof repo, ".");
	snprintf(buf, cap, "%s/../shared/aws-sigv4-testsuite", repo);
	return buf;
}

/* One check of the limits below: counted, and said when it fails. */
static void
expect(struct tally *t, int ok, const char *what)
{
	if (ok)
		t->passed++;
	else
		t->failed++, printf("FAIL %s\n", what);
}

/* A request to sign with AWS's example credentials: host and x-amz-date,
 * plus whatever the check sets. */
static struct apm_sigv4
plain_request(const struct apm_http_header *h, size_t nh)
{
	struct apm_sigv4 s = { .method = "GET", .path = "/", .query = "",
		.headers = h, .num_headers = nh, .payload = "", .payload_len = 0,
		.region = "us-east-1", .service = "service", .amz_date = AMZ_DATE,
		.access_key = ACCESS_KEY, .secret_key = SECRET_KEY,
		.session_token = NULL };
	return s;
}

/* The canonical request's line k (0: the method), in line. */
static const char *
creq_line(const char *creq, int k, char *line, size_t cap)
{
	const char *p = creq;
	for (; k > 0 && p; k--)
		if ((p = strchr(p, '\n')) != NULL)
			p++;
	snprintf(line, cap, "%.*s", p ? (int)strcspn(p, "\n") : 0, p ? p : "");
	return line;
}

/*
 * Where the signer stops: an output buffer one byte short of the text and
 * its NUL; more than 64 path segments; more than 32 query parameters, or one
 * of 512 bytes or more; more than 32 headers, a header name empty or of 64
 * bytes or more; an x-amz-date shorter than its date. Each is refused (-1)
 * by every step that depends on it: never signed truncated. Empty query
 * keys are dropped, as AWS does.
 */
static void
limits(struct tally *t)
{
	static const struct apm_http_header base[] = {
		{ { "Host", 4 }, { "example.amazonaws.com", 21 } },
		{ { "X-Amz-Date", 10 }, { AMZ_DATE, 16 } },
	};
	static struct apm_http_header many[40];
	static char names[40][80], path[1024], query[16384], out[16384], line[2048];
	struct apm_sigv4 s = plain_request(base, 2);
	int (*const steps[])(const struct apm_sigv4 *, char *, size_t) = {
		apm_sigv4_canonical, apm_sigv4_string_to_sign,
		apm_sigv4_authorization };
	static const char *const step_names[] = { "canonical request",
		"string to sign", "Authorization" };

	/* each step's output: its length and NUL fit, one byte less does not */
	for (int k = 0; k < 3; k++) {
		char what[160];
		int n = steps[k](&s, out, sizeof out);
		snprintf(what, sizeof what, "%s: %d bytes, in %d+1, in %d and in 0",
		    step_names[k], n, n, n);
		expect(t, n > 0 && steps[k](&s, out, (size_t)n + 1) == n &&
		    (size_t)n == strlen(out) && steps[k](&s, out, (size_t)n) == -1 &&
		    steps[k](&s, out, 0) == -1, what);
	}

	/* path segments: 64 signed, 65 refused */
	size_t pl = 0;
	for (int i = 0; i < 64; i++)
		pl += (size_t)sprintf(path + pl, "/s%d", i);
	s.path = path;
	int n = apm_sigv4_canonical(&s, out, sizeof out);
	expect(t, n > 0 && strcmp(creq_line(out, 1, line, sizeof line), path) == 0,
	    "64 path segments are signed as they are");
	strcpy(path + pl, "/extra");
	for (int k = 0; k < 3; k++) {
		char what[80];
		snprintf(what, sizeof what, "%s: 65 path segments refused", step_names[k]);
		expect(t, steps[k](&s, out, sizeof out) == -1, what);
	}
	s.path = "/";

	/* empty keys are dropped; 32 parameters signed, 33 refused */
	s.query = "&=x&b=2&&a=1&=&";
	n = apm_sigv4_canonical(&s, out, sizeof out);
	expect(t, n > 0 && strcmp(creq_line(out, 2, line, sizeof line), "a=1&b=2") == 0,
	    "query parameters with an empty key are dropped");
	size_t ql = 0;
	for (int i = 0; i < 32; i++)
		ql += (size_t)sprintf(query + ql, "%sk%02d=%d", i ? "&" : "", 31 - i, i);
	s.query = query;
	n = apm_sigv4_canonical(&s, out, sizeof out);
	creq_line(out, 2, line, sizeof line);
	expect(t, n > 0 && strncmp(line, "k00=31&k01=30&", 14) == 0 &&
	    strlen(line) == (size_t)ql, "32 query parameters, sorted");
	strcpy(query + ql, "&k32=32");
	for (int k = 0; k < 3; k++) {
		char what[80];
		snprintf(what, sizeof what, "%s: 33 query parameters refused", step_names[k]);
		expect(t, steps[k](&s, out, sizeof out) == -1, what);
	}
	/* a key or a value of 511 bytes is signed, of 512 refused */
	for (int part = 0; part < 2; part++)
		for (size_t len = 511; len <= 512; len++) {
			char what[80];
			if (part == 0) {
				memset(query, 'k', len);
				strcpy(query + len, "=v");
			} else {
				strcpy(query, "k=");
				memset(query + 2, 'v', len);
				query[2 + len] = 0;
			}
			n = apm_sigv4_canonical(&s, out, sizeof out);
			snprintf(what, sizeof what, "a query %s of %zu bytes %s",
			    part ? "value" : "key", len, len == 511 ? "signed" : "refused");
			expect(t, len == 511 ? n > 0 && strcmp(creq_line(out, 2, line,
			    sizeof line), query) == 0 : n == -1, what);
		}
	s.query = "";

	/* headers: 32 signed, 33 refused; a name empty or of 64 bytes refused */
	for (int i = 0; i < 40; i++) {
		snprintf(names[i], sizeof names[i], "X-Amz-Meta-%02d", i);
		many[i].name = (struct apm_str){ names[i], strlen(names[i]) };
		many[i].value = (struct apm_str){ "v", 1 };
	}
	many[0] = base[0];
	many[1] = base[1];
	for (size_t nh = 32; nh <= 33; nh++) {
		s = plain_request(many, nh);
		for (int k = 0; k < 3; k++) {
			char what[80];
			n = steps[k](&s, out, sizeof out);
			snprintf(what, sizeof what, "%s: %zu headers %s", step_names[k], nh,
			    nh == 32 ? "signed" : "refused");
			expect(t, nh == 32 ? n > 0 : n == -1, what);
		}
	}
	for (size_t len = 0; len <= 64; len += 1) {
		if (len > 0 && len < 63)
			continue;
		char what[80];
		memset(names[2], 'x', len);
		many[2].name = (struct apm_str){ names[2], len };
		s = plain_request(many, 3);
		snprintf(what, sizeof what, "a header name of %zu bytes %s", len,
		    len == 63 ? "signed" : "refused");
		for (int k = 0; k < 3; k++)
			expect(t, len == 63 ? steps[k](&s, out, sizeof out) > 0 :
			    steps[k](&s, out, sizeof out) == -1, what);
	}

	/* A key of fewer than 512 bytes whose encoding passes the
	 * 767 bytes of its slot is signed cut short (300 '*', each "%2A":
	 * 255 of them signed), never refused */
	memset(query, '*', 300);
	strcpy(query + 300, "=v");
	s = plain_request(base, 2);
	s.query = query;
	n = apm_sigv4_canonical(&s, out, sizeof out);
	expect(t, n == -1 || strlen(creq_line(out, 2, line, sizeof line)) ==
	    300 * 3 + 2, "a query key of 300 '*': refused or signed whole");

	/* an x-amz-date without its 8 date digits: no credential scope */
	s = plain_request(base, 2);
	s.amz_date = "2015083";
	expect(t, apm_sigv4_canonical(&s, out, sizeof out) > 0,
	    "a short x-amz-date: the canonical request does not use it");
	expect(t, apm_sigv4_string_to_sign(&s, out, sizeof out) == -1,
	    "a short x-amz-date: no string to sign");
	expect(t, apm_sigv4_authorization(&s, out, sizeof out) == -1,
	    "a short x-amz-date: no Authorization");
}

/*
 * The session token's place in the signed-header list when it sorts first
 * (every signed name after "x-amz-security-token"): the list starts with it
 * and a ';' follows, in the canonical request and in Authorization alike.
 */
static void
token_first(struct tally *t)
{
	static const struct apm_http_header only[] = {
		{ { "Zz-Custom", 9 }, { "v", 1 } },
	};
	static char out[4096], line[512];
	struct apm_sigv4 s = plain_request(only, 1);
	s.session_token = "TOKEN";
	int n = apm_sigv4_canonical(&s, out, sizeof out);
	expect(t, n > 0 && strcmp(creq_line(out, 6, line, sizeof line),
	    "x-amz-security-token;zz-custom") == 0,
	    "session token sorting first: the canonical request's signed headers");
	n = apm_sigv4_authorization(&s, out, sizeof out);
	expect(t, n > 0 && strstr(out, " SignedHeaders=x-amz-security-token;zz-custom, ") != NULL,
	    "session token sorting first: Authorization's SignedHeaders");
}

int
main(int argc, char **argv)
{
	struct tally t = { 0, 0, 0 };
	unsigned char out[64];
	char buf[PATH_MAX + 64];

	if (argc > 1) {
		fprintf(stderr, "usage: %s (no arguments; the optional AWS test "
		    "suite's folder is $AWS_SIGV4_TESTSUITE)\n", argv[0]);
		return 2;
	}
	for (size_t i = 0; i < sizeof embedded / sizeof embedded[0]; i++)
		run_case(&embedded[i], &t);
	printf("embedded: %zu cases\n", sizeof embedded / sizeof embedded[0]);

	/* base64 as used for SecretBinary */
	int n = apm_base64_decode("aGVsbG8gd29ybGQ=", 16, out, sizeof out);
	if (n == 11 && memcmp(out, "hello world", 11) == 0)
		t.passed++;
	else
		t.failed++, printf("FAIL base64\n");
	if (apm_base64_decode("a*b=", 4, out, sizeof out) == -1)
		t.passed++;
	else
		t.failed++, printf("FAIL base64 garbage accepted\n");

	/* the signing key "AWS4" + secret has room for 255 bytes: a secret of
	 * 251 signs, one of 252 is refused (never signed truncated) */
	for (size_t len = 251; len <= 252; len++) {
		char secret[300], authz[2048];
		memset(secret, 'k', len);
		secret[len] = 0;
		struct apm_sigv4 s = { .method = "POST", .path = "/", .query = "",
			.headers = NULL, .num_headers = 0, .payload = "", .payload_len = 0,
			.region = "us-east-1", .service = "secretsmanager",
			.amz_date = AMZ_DATE, .access_key = ACCESS_KEY,
			.secret_key = secret, .session_token = NULL };
		int r = apm_sigv4_authorization(&s, authz, sizeof authz);
		if (len == 251 ? r > 0 : r == -1)
			t.passed++;
		else
			t.failed++, printf("FAIL a %zu-byte secret key: %s\n", len,
			    r < 0 ? "refused" : "signed");
	}

	limits(&t);
	token_first(&t);

	const char *dir = suite_dir(buf, sizeof buf);
	if (is_dir(dir)) {
		int cases = walk(dir, "", &t);
		printf("AWS SigV4 test suite (%s): %d cases\n", dir, cases);
		if (cases == 0)
			t.failed++, printf("FAIL %s holds no test case (NAME/NAME.req)\n", dir);
	} else {
		t.skipped++;
		printf("AWS SigV4 test suite absent (no folder %s): skipped; set "
		    "AWS_SIGV4_TESTSUITE to botocore's tests/unit/auth/aws4_testsuite "
		    "to run it\n", dir);
	}
	printf("%d passed, %d failed", t.passed, t.failed);
	if (t.skipped)
		printf(", %d skipped", t.skipped);
	printf("\n");
	return t.failed != 0;
}
