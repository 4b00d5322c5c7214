package loadtest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// jobView is the part of sluice's job JSON (GET /v1/jobs/{id}, and the 202
// of POST /v1/jobs) that the load tester reads.
type jobView struct {
	ID        string     `json:"id"`
	Status    string     `json:"status"`
	UserID    string     `json:"user_id"`
	Position  *int       `json:"position"`
	Attempts  int        `json:"attempts"`
	CreatedAt time.Time  `json:"created_at"`
	StartedAt *time.Time `json:"started_at"`
	// DispatchedAt and DispatchSeq: the scheduler's own dispatch time and
	// order (absent from sluices that predate them).
	DispatchedAt *time.Time `json:"dispatched_at"`
	DispatchSeq  int64      `json:"dispatch_seq"`
	FinishedAt   *time.Time `json:"finished_at"`
	Usage        *struct {
		InputTokens              int `json:"input_tokens"`
		OutputTokens             int `json:"output_tokens"`
		CacheCreationInputTokens int `json:"cache_creation_input_tokens"`
		CacheReadInputTokens     int `json:"cache_read_input_tokens"`
	} `json:"usage"`
	Error *struct {
		Type    string `json:"type"`
		Message string `json:"message"`
	} `json:"error"`
	// DispatchedVia is how the job went upstream: "messages" or "batch"
	// (BatchID its Message Batch); absent before its dispatch and from
	// sluices that predate batches.
	DispatchedVia string `json:"dispatched_via"`
	BatchID       string `json:"batch_id"`
	// CostUSD is what its upstream calls cost at sluice's prices; absent
	// before the first call and for a model without a price.
	CostUSD *float64 `json:"cost_usd"`
}

// terminal reports whether the status is final.
func terminal(status string) bool {
	switch status {
	case "succeeded", "failed", "canceled", "expired":
		return true
	}
	return false
}

// sluiceClient speaks sluice's job API.
type sluiceClient struct {
	http *http.Client
	base string
	key  string
}

// submitBody is a POST /v1/jobs body.
type submitBody struct {
	UserID  string         `json:"user_id"`
	Class   string         `json:"class,omitempty"` // the service class; "" = sluice's default
	Request messageRequest `json:"request"`

	// DeadlineSeconds is the job's deadline; 0 = none.
	DeadlineSeconds int `json:"deadline_seconds,omitempty"`
}

type messageRequest struct {
	Model     string        `json:"model"`
	MaxTokens int           `json:"max_tokens"`
	System    []systemBlock `json:"system,omitempty"`
	Messages  []message     `json:"messages"`
}

// systemBlock is a text block of the system prompt, marked for prompt
// caching or not.
type systemBlock struct {
	Type         string        `json:"type"`
	Text         string        `json:"text"`
	CacheControl *cacheControl `json:"cache_control,omitempty"`
}

type cacheControl struct {
	Type string `json:"type"`
}

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// submit posts a job. A 202 gives the job; any other status is returned
// with the start of the body for the caller to judge (a 429 or 503 is a
// refusal, not an error of the run).
func (c *sluiceClient) submit(ctx context.Context, body submitBody) (v jobView, status int, detail string, err error) {
	b, err := json.Marshal(body)
	if err != nil {
		return v, 0, "", err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+"/v1/jobs", bytes.NewReader(b))
	if err != nil {
		return v, 0, "", err
	}
	req.Header.Set("content-type", "application/json")
	req.Header.Set("x-api-key", c.key)
	return c.do(req, http.StatusAccepted, &v)
}

// get reads a job.
func (c *sluiceClient) get(ctx context.Context, id string) (v jobView, status int, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/v1/jobs/"+id, nil)
	if err != nil {
		return v, 0, err
	}
	req.Header.Set("x-api-key", c.key)
	v, status, _, err = c.do(req, http.StatusOK, &v)
	return v, status, err
}

// do sends req and decodes a want answer into out.
func (c *sluiceClient) do(req *http.Request, want int, out *jobView) (jobView, int, string, error) {
	resp, err := c.http.Do(req)
	if err != nil {
		return *out, 0, "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != want {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return *out, resp.StatusCode, strings.TrimSpace(string(b)), nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return *out, resp.StatusCode, "", fmt.Errorf("%s %s: reading the answer: %w", req.Method, req.URL.Path, err)
	}
	return *out, resp.StatusCode, "", nil
}

// fakeStats is the part of the fake upstream's GET /_fake/stats that the
// load tester reads (see fakeanthropic.Stats).
type fakeStats struct {
	Requests             int64            `json:"requests"`
	ByStatus             map[string]int64 `json:"by_status"`
	RateLimited          int64            `json:"rate_limited"`
	InFlight             int64            `json:"in_flight"`
	MaxInFlight          int64            `json:"max_in_flight"`
	AdmittedInputTokens  map[string]int64 `json:"admitted_input_tokens"`
	AdmittedOutputTokens map[string]int64 `json:"admitted_output_tokens"`
	AdmittedRequests     map[string]int64 `json:"admitted_requests"`
	AdmittedCacheRead    map[string]int64 `json:"admitted_cache_read_input_tokens"`
	AdmittedCacheWrite   map[string]int64 `json:"admitted_cache_creation_input_tokens"`
	CacheWriteRequests   map[string]int64 `json:"cache_write_requests"`
	// Batches and BatchRequests count the Message Batches created and the
	// requests in them (not in Requests).
	Batches       int64 `json:"batches"`
	BatchRequests int64 `json:"batch_requests"`
}

// counters are the admitted amounts of group, or of every group when
// group is "".
func (s fakeStats) counters(group string) Counters {
	sum := func(m map[string]int64) float64 {
		var n int64
		for g, v := range m {
			if group == "" || g == group {
				n += v
			}
		}
		return float64(n)
	}
	return Counters{sum(s.AdmittedRequests), sum(s.AdmittedInputTokens), sum(s.AdmittedOutputTokens)}
}

// fakeClient reads the fake upstream's counters.
type fakeClient struct {
	http *http.Client
	base string
}

func (f *fakeClient) stats(ctx context.Context) (fakeStats, error) {
	var st fakeStats
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.base+"/_fake/stats?log=0", nil)
	if err != nil {
		return st, err
	}
	resp, err := f.http.Do(req)
	if err != nil {
		return st, fmt.Errorf("fake upstream stats: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return st, fmt.Errorf("fake upstream stats: %s (is %s a sluice fake-anthropic?)", resp.Status, f.base)
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return st, fmt.Errorf("fake upstream stats: %w", err)
	}
	return st, nil
}
