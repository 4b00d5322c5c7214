package api_test

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
)

const (
	nfcJose = "jos\u00e9"  // é precomposed
	nfdJose = "jose\u0301" // e + combining acute accent
)

// errorBody is the api's error shape.
type errorBody struct {
	Error struct {
		Type    string `json:"type"`
		Message string `json:"message"`
		Field   string `json:"field"`
	} `json:"error"`
}

func decodeError(t *testing.T, b []byte) errorBody {
	t.Helper()
	var e errorBody
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatalf("error body %s: %v", b, err)
	}
	return e
}

// usageOf is GET /v1/users/{rawPath}/usage, the user id already escaped as
// the test wants it sent.
func usageOf(t *testing.T, e *harness.Env, rawPath string) (int, map[string]any, []byte) {
	t.Helper()
	resp, b := e.Do(t, http.MethodGet, "/v1/users/"+rawPath+"/usage", harness.TenantKey, nil)
	var m map[string]any
	_ = json.Unmarshal(b, &m)
	return resp.StatusCode, m, b
}

// A user id may be any printable or formatting text (emoji sequences,
// NBSP, the ideographic space, bidi marks), is kept in NFC, and may not
// hold control characters or line/paragraph separators.
func TestUserIDRule(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	for _, tc := range []struct {
		name, user, want string
	}{
		{"emoji ZWJ sequence", "👩\u200d🎓", "👩\u200d🎓"},
		{"NBSP", "ann\u00a0lee", "ann\u00a0lee"},
		{"ideographic space", "山田\u3000太郎", "山田\u3000太郎"},
		{"LRM", "\u200eדוד", "\u200eדוד"},
		{"NFD becomes NFC", nfdJose, nfcJose},
		{"slash", "a/b", "a/b"},
		{"ASCII space", "ann lee", "ann lee"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := e.Submit(t, harness.JobBody(tc.user, "hi"))
			if v.UserID != tc.want {
				t.Fatalf("user_id = %q (%+q), want %+q", v.UserID, v.UserID, tc.want)
			}
		})
	}
	for _, tc := range []struct {
		name, user, mention string
	}{
		{"line separator", "a\u2028b", "U+2028"},
		{"paragraph separator", "a\u2029b", "U+2029"},
		{"bell", "a\u0007b", "control"},
		{"tab", "a\tb", "control"},
		{"DEL", "a\u007fb", "control"},
		{"C1 control", "a\u0085b", "U+0085"},
		{"private use", "a\ue000b", "private-use"},
		{"empty", "", "empty"},
		{"257 characters", strings.Repeat("é", 257), "256"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, harness.JobBody(tc.user, "hi"))
			if resp.StatusCode != http.StatusBadRequest {
				t.Fatalf("%q: %d %s, want 400", tc.user, resp.StatusCode, b)
			}
			if eb := decodeError(t, b); eb.Error.Field != "user_id" || !strings.Contains(eb.Error.Message, tc.mention) {
				t.Fatalf("%q: %+v; want field user_id and a message that mentions %q", tc.user, eb.Error, tc.mention)
			}
		})
	}
	// 256 characters once composed are within the limit, however long the
	// NFD form sent.
	if v := e.Submit(t, harness.JobBody(strings.Repeat("e\u0301", 256), "hi")); v.UserID != strings.Repeat("é", 256) {
		t.Fatalf("256 NFD é: user_id %q", v.UserID)
	}
}

// The same user written in NFC and NFD is one user wherever it enters: the
// body's user_id and request.metadata.user_id, ?user_id=, and the path.
func TestUserIDNormalizedEverywhere(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	body := harness.JobBody(nfcJose, "hi")
	body["request"].(map[string]any)["metadata"] = map[string]any{"user_id": nfdJose}
	v := e.Submit(t, body) // both given, the same user: accepted
	if v.UserID != nfcJose {
		t.Fatalf("user_id = %+q", v.UserID)
	}
	e.Submit(t, harness.JobBody(nfdJose, "hi"))

	for _, sent := range []string{nfcJose, nfdJose} {
		code, m, b := usageOf(t, e, url.PathEscape(sent))
		if code != http.StatusOK || m["user_id"] != nfcJose || m["queued"] != float64(2) {
			t.Fatalf("usage of %+q: %d %s; want user %+q with 2 queued", sent, code, b, nfcJose)
		}
		resp, b := e.Do(t, http.MethodGet, "/v1/jobs?user_id="+url.QueryEscape(sent), harness.TenantKey, nil)
		var list struct{ Jobs []jobs.View }
		_ = json.Unmarshal(b, &list)
		if resp.StatusCode != http.StatusOK || len(list.Jobs) != 2 {
			t.Fatalf("list of %+q: %d %s; want 2 jobs", sent, resp.StatusCode, b)
		}
		resp, b = e.Do(t, http.MethodGet, "/v1/jobs/"+v.ID+"?user_id="+url.QueryEscape(sent), harness.TenantKey, nil)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("job as %+q: %d %s", sent, resp.StatusCode, b)
		}
	}
}

// Path parameters are percent-decoded once, whatever Echo matched on: a
// user id with %2F is the user a POST body names with "/", and a
// refused character is a 400 that says which.
func TestPathParamsDecoded(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	v := e.Submit(t, harness.JobBody("a/b", "hi"))
	e.Submit(t, harness.JobBody("a/bé", "hi"))
	e.Submit(t, harness.JobBody("👩\u200d🎓", "hi"))
	e.Submit(t, harness.JobBody("100%", "hi"))

	for _, tc := range []struct{ raw, user string }{
		{"a%2Fb", "a/b"},
		{"a%2fb", "a/b"},
		{"a%2Fb%C3%A9", "a/bé"}, // decoded once, with the %2F that makes Echo match the raw path
		{url.PathEscape("👩\u200d🎓"), "👩\u200d🎓"},
		{"100%25", "100%"},
	} {
		code, m, b := usageOf(t, e, tc.raw)
		if code != http.StatusOK || m["user_id"] != tc.user || m["queued"] != float64(1) {
			t.Errorf("GET /v1/users/%s/usage: %d %s; want user %q with 1 queued", tc.raw, code, b, tc.user)
		}
	}
	for _, tc := range []struct{ raw, mention string }{
		{"a%00b", "U+0000 (a control character)"},
		{"a%0Ab", "U+000A (a control character)"},
		{"a%E2%80%A8b", "U+2028 (a line separator)"},
		{"a%2Fb%00", "U+0000"},
		{"a%FFb", "UTF-8"},
		{"a%2F%FF", "UTF-8"},
	} {
		code, _, b := usageOf(t, e, tc.raw)
		if code != http.StatusBadRequest {
			t.Errorf("GET /v1/users/%s/usage: %d %s; want 400", tc.raw, code, b)
			continue
		}
		if eb := decodeError(t, b); eb.Error.Field != "user_id" || !strings.Contains(eb.Error.Message, tc.mention) {
			t.Errorf("GET /v1/users/%s/usage: %+v; want field user_id, a message that mentions %q", tc.raw, eb.Error, tc.mention)
		}
	}

	// Job ids go through the same decoding: an escaped letter is the letter.
	escaped := "%6A" + v.ID[1:] // %6A: the 'j' of "job_"
	resp, b := e.Do(t, http.MethodGet, "/v1/jobs/"+escaped, harness.TenantKey, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /v1/jobs/%s: %d %s", escaped, resp.StatusCode, b)
	}
	resp, b = e.Do(t, http.MethodGet, "/v1/jobs/"+v.ID+"%2F", harness.TenantKey, nil)
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("GET /v1/jobs/%s%%2F: %d %s; want 404", v.ID, resp.StatusCode, b)
	}
}

// A user_id inside request is in the wrong place, and the refusal says
// where it belongs (job and Messages API alike).
func TestUserIDInTheWrongPlace(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	body := `{"request":{"user_id":"alice","model":"claude-sonnet-4-6","messages":[{"role":"user","content":"hi"}]}}`
	resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, body)
	eb := decodeError(t, b)
	if resp.StatusCode != http.StatusBadRequest || eb.Error.Field != "request.user_id" ||
		!strings.Contains(eb.Error.Message, "wrong place") || !strings.Contains(eb.Error.Message, "top level") ||
		!strings.Contains(eb.Error.Message, "request.metadata.user_id") {
		t.Fatalf("request.user_id: %d %s", resp.StatusCode, b)
	}
	// Messages API: a top-level user_id is its request.user_id.
	msg := `{"user_id":"alice","model":"claude-sonnet-4-6","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}`
	resp, b = e.Do(t, http.MethodPost, "/v1/messages", harness.TenantKey, msg)
	var ab struct {
		Error struct{ Type, Message string }
	}
	_ = json.Unmarshal(b, &ab)
	if resp.StatusCode != http.StatusBadRequest || !strings.HasPrefix(ab.Error.Message, "user_id is in the wrong place: give the user id as metadata.user_id") {
		t.Fatalf("messages with a top-level user_id: %d %s", resp.StatusCode, b)
	}
	// metadata.user_id follows the same rule on /v1/messages.
	msg = `{"model":"claude-sonnet-4-6","max_tokens":10,"metadata":{"user_id":"a\u2028b"},"messages":[{"role":"user","content":"hi"}]}`
	resp, b = e.Do(t, http.MethodPost, "/v1/messages", harness.TenantKey, msg)
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(b), "U+2028") {
		t.Fatalf("messages with U+2028 in metadata.user_id: %d %s", resp.StatusCode, b)
	}
}

// A Messages request's metadata.user_id is normalised like a job's.
func TestMessagesUserIDNormalized(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	msg := `{"model":"claude-sonnet-4-6","max_tokens":10,"metadata":{"user_id":"` + nfdJose + `"},"messages":[{"role":"user","content":"hi"}]}`
	resp, b := e.Do(t, http.MethodPost, "/v1/messages", harness.TenantKey, msg)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("messages: %d %s", resp.StatusCode, b)
	}
	resp, b = e.Do(t, http.MethodGet, "/v1/jobs?user_id="+url.QueryEscape(nfcJose), harness.TenantKey, nil)
	var list struct{ Jobs []jobs.View }
	_ = json.Unmarshal(b, &list)
	if resp.StatusCode != http.StatusOK || len(list.Jobs) != 1 || list.Jobs[0].UserID != nfcJose {
		t.Fatalf("the Messages request's job under %+q: %d %s", nfcJose, resp.StatusCode, b)
	}
}
