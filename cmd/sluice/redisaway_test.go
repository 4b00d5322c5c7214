package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/jobs"
)

// While Redis is away (killed, or stalled with SIGSTOP), every route answers
// 503 with Retry-After within the Redis timeout, the event stream tells an
// EventSource to come back, and once Redis returns the same process serves
// again without a restart.
func TestRedisAwayAnswers503Fast(t *testing.T) {
	for _, fault := range []string{"killed", "stalled"} {
		t.Run(fault, func(t *testing.T) {
			r := redistest.Start(t)
			_, fsrv := startFake(t)
			path := writeConfig(t, r.URL, fsrv.URL)
			// redis.timeout 1 s: a 503 within 3 s leaves 2 s for a busy
			// machine (the whole suite runs at once on two cores).
			appendFile(t, path, "redis:\n  timeout: 1s\n")
			env := map[string]string{"ANTHROPIC_API_KEY": harness.UpstreamKey}
			base, stderr, _ := startRun(t, []string{"serve", "--config", path, "--listen", "127.0.0.1:0"}, func(k string) string { return env[k] })

			code, body, _ := call(t, base, http.MethodPost, "/v1/jobs", jobBody("before"))
			if code != http.StatusAccepted {
				t.Fatalf("submit before the fault: %d %s", code, body)
			}
			var v jobs.View
			if err := json.Unmarshal(body, &v); err != nil {
				t.Fatal(err)
			}

			switch fault {
			case "killed":
				r.Kill(t)
			case "stalled":
				r.Pause(t)
			}
			routes := []struct{ method, path, body string }{
				{http.MethodPost, "/v1/jobs", jobBody("during")},
				{http.MethodGet, "/v1/jobs/" + v.ID, ""},
				{http.MethodGet, "/v1/jobs?user_id=alice", ""},
				{http.MethodDelete, "/v1/jobs/" + v.ID, ""},
				{http.MethodPost, "/v1/messages", `{"model":"claude-sonnet-4-6","max_tokens":20,"metadata":{"user_id":"alice"},"messages":[{"role":"user","content":"hi"}]}`},
			}
			for _, rt := range routes {
				code, body, h := call(t, base, rt.method, rt.path, rt.body)
				if code != http.StatusServiceUnavailable || h.Get("Retry-After") == "" {
					t.Errorf("%s %s while Redis is %s: %d (Retry-After %q) %s; want 503 with Retry-After", rt.method, rt.path, fault, code, h.Get("Retry-After"), body)
				}
				if rt.path != "/v1/messages" && !strings.Contains(string(body), `"type":"unavailable"`) {
					t.Errorf("%s %s: body %s; want type unavailable", rt.method, rt.path, body)
				}
			}
			// The event stream: a 200 stream whose `unavailable` event and retry
			// field send an EventSource back later.
			ev := readEvents(t, base+"/v1/jobs/"+v.ID+"/events?token="+v.Token)
			if !strings.Contains(ev, "event: unavailable") || !strings.Contains(ev, "retry: ") {
				t.Errorf("event stream while Redis is %s:\n%s", fault, ev)
			}
			// Readiness says so within its deadline.
			if code, body, _ := call(t, base, http.MethodGet, "/readyz", ""); code != http.StatusServiceUnavailable {
				t.Errorf("/readyz while Redis is %s: %d %s", fault, code, body)
			}

			switch fault {
			case "killed":
				r.Revive(t)
			case "stalled":
				r.Resume(t)
			}
			harness.Eventually(t, 20*time.Second, func() bool {
				code, _, _ := call(t, base, http.MethodGet, "/v1/jobs/"+v.ID, "")
				return code == http.StatusOK
			}, "the api to serve again once Redis is back")
			code, body, _ = call(t, base, http.MethodPost, "/v1/jobs", jobBody("after"))
			if code != http.StatusAccepted {
				t.Fatalf("submit after Redis came back: %d %s", code, body)
			}
			if testing.Verbose() {
				t.Log(stderr.String())
			}
			if n := strings.Count(stderr.String(), "Redis is unavailable: answering 503"); n != 1 {
				t.Errorf("the api logged the outage %d times; want once", n)
			}
		})
	}
}

// call sends one request with the tenant key; a call slower than 3 s fails
// the test.
func call(t *testing.T, base, method, path string, body ...string) (int, []byte, http.Header) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var rd io.Reader
	if len(body) > 0 && body[0] != "" {
		rd = strings.NewReader(body[0])
	}
	req, _ := http.NewRequestWithContext(ctx, method, base+path, rd)
	req.Header.Set("x-api-key", harness.TenantKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b, resp.Header
}

func jobBody(text string) string {
	return fmt.Sprintf(`{"user_id":"alice","request":{"model":"claude-sonnet-4-6","max_tokens":20,"messages":[{"role":"user","content":%q}]}}`, text)
}

// readEvents reads an event stream until the server ends it (within 3 s).
func readEvents(t *testing.T, url string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("events: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("events: %d %s", resp.StatusCode, b)
	}
	var out strings.Builder
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		out.WriteString(sc.Text() + "\n")
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("events: %v (the stream was not ended by the server)\n%s", err, out.String())
	}
	return out.String()
}

func appendFile(t *testing.T, path, text string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(text); err != nil {
		t.Fatal(err)
	}
}
