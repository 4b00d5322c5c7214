// Package jobs owns the job record and its event log in Redis: what a job is,
// who owns it, the status transitions it may make, and the per-job stream of
// events that SSE clients replay and follow.
package jobs

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base32"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/internal/rkeys"
)

// Status is where a job is in its life.
//
//	queued → running → succeeded | failed
//	queued → canceled | expired
//	running → canceled
//
// Terminal states are final; a retried attempt stays running.
type Status string

const (
	Queued    Status = "queued"
	Running   Status = "running"
	Succeeded Status = "succeeded"
	Failed    Status = "failed"
	Canceled  Status = "canceled"
	Expired   Status = "expired"
)

// Terminal reports whether no further transition is possible.
func (s Status) Terminal() bool {
	switch s {
	case Succeeded, Failed, Canceled, Expired:
		return true
	}
	return false
}

// Usage is the upstream's token usage of a job (the Messages API names).
type Usage struct {
	InputTokens              int `json:"input_tokens"`
	OutputTokens             int `json:"output_tokens"`
	CacheCreationInputTokens int `json:"cache_creation_input_tokens"`
	CacheReadInputTokens     int `json:"cache_read_input_tokens"`
	// CacheCreation splits CacheCreationInputTokens by cache lifetime, as
	// the upstream reports it (absent when it did not).
	CacheCreation *struct {
		Ephemeral5m int `json:"ephemeral_5m_input_tokens"`
		Ephemeral1h int `json:"ephemeral_1h_input_tokens"`
	} `json:"cache_creation,omitempty"`
}

// Error is why a job failed, in words for a person.
type Error struct {
	Type    string `json:"type"`
	Message string `json:"message"`
}

// Job is one chat request on behalf of one user of one tenant.
type Job struct {
	ID     string
	Tenant string
	UserID string
	// Model is the model that runs the job; Group the model group that
	// serves it.
	Model string
	Group string
	// RequestedModel is the model the request named when the job fell
	// back to another model group ("" when it did not); FallbackFrom is
	// the group that could not take it and FallbackReason why:
	// config.FallbackOnWait or config.FallbackOnOutage.
	RequestedModel string
	FallbackFrom   string
	FallbackReason string
	Status         Status
	MaxTokens      int
	Attempts       int
	// Request is the Messages body as the upstream will get it, minus
	// stream and with the user's own metadata.user_id removed.
	Request  json.RawMessage
	Metadata json.RawMessage // the client's own job metadata, returned as given
	// Class is the job's service class: "interactive" (also "", a record
	// from before classes) or "background".
	Class      string
	CreatedAt  time.Time
	DeadlineAt time.Time // zero = none: a job not started by then expires
	// DispatchedAt and DispatchSeq: when the scheduler first handed the job
	// to a worker, and its place in the group's dispatch order.
	DispatchedAt time.Time
	DispatchSeq  int64
	StartedAt    time.Time
	FinishedAt   time.Time
	NotBefore    time.Time       // the next attempt waits until then (a retry's delay)
	Result       json.RawMessage // the upstream Message
	Text         string
	Usage        *Usage
	Error        *Error
	TokenHash    string // sha256 of the job's read token, hex

	// Scheduling state, kept by the scheduler's scripts.
	FQMember     string // the job's member in its group's fair queue
	FQTag        string // its start tag there (kept across retries)
	CostMicroUSD int64  // what its calls cost so far, in µ$ (0: none priced)
	CostIn       int    // input tokens estimated at admission
	CostOut      int    // output tokens reserved (max_tokens)
	Dispatch     int    // how many times it was handed to a worker
	// FirstEvent is the data of the job's first `queued` event (its place
	// at admission), kept in the record.
	FirstEvent string
	Failures   int // failed upstream attempts (rate-limit waits and the upstream's own failures excluded)
	// InfraFailures counts the attempts that failed for a reason of the
	// upstream's own, and UnavailableSince is when the first of them failed.
	InfraFailures    int
	UnavailableSince time.Time
	// Via is how the job went upstream: "batch" (the Message Batches API)
	// or "" (the Messages API); BatchID is its batch. BatchDue, when set,
	// is when a job admitted for a batch joins the Messages line if no
	// batch took it; BatchClaim names the take that put it in a batch.
	Via        string
	BatchID    string
	BatchDue   time.Time
	BatchClaim string
}

// View is a job as the API shows it.
type View struct {
	ID     string `json:"id"`
	Status Status `json:"status"`
	UserID string `json:"user_id"`
	Model  string `json:"model"`
	// RequestedModel is the model the request asked for, shown only when
	// the job fell back to another model (Model); FallbackReason is then
	// why: "on_wait" or "on_outage".
	RequestedModel string `json:"requested_model,omitempty"`
	FallbackReason string `json:"fallback_reason,omitempty"`
	MaxTokens      int    `json:"max_tokens"`
	Class          string `json:"class"`
	Position       *int   `json:"position,omitempty"`
	ETASeconds     *int   `json:"eta_seconds,omitempty"`
	// WaitReason says why a queued job's eta is unknown:
	// "upstream_unavailable" while its model group is in outage.
	WaitReason string     `json:"wait_reason,omitempty"`
	Attempts   int        `json:"attempts"`
	CreatedAt  time.Time  `json:"created_at"`
	DeadlineAt *time.Time `json:"deadline_at,omitempty"`
	// DispatchedAt is when the scheduler first handed the job to a worker;
	// DispatchSeq its place in its model group's dispatch order (the order
	// fair queuing chose; started_at can differ by a few milliseconds).
	DispatchedAt *time.Time      `json:"dispatched_at,omitempty"`
	DispatchSeq  int64           `json:"dispatch_seq,omitempty"`
	StartedAt    *time.Time      `json:"started_at,omitempty"`
	FinishedAt   *time.Time      `json:"finished_at,omitempty"`
	Result       json.RawMessage `json:"result,omitempty"`
	Text         *string         `json:"text,omitempty"`
	Usage        *Usage          `json:"usage,omitempty"`
	// DispatchedVia is how the job went upstream once dispatched:
	// "messages" or "batch" (the Message Batches API, BatchID its batch).
	DispatchedVia string `json:"dispatched_via,omitempty"`
	BatchID       string `json:"batch_id,omitempty"`
	// CostUSD is what the job's upstream calls cost, in US dollars, at the
	// configured prices (absent before its first call, and for a model
	// the price list lacks).
	CostUSD  *float64        `json:"cost_usd,omitempty"`
	Error    *Error          `json:"error,omitempty"`
	Metadata json.RawMessage `json:"metadata,omitempty"`
	Token    string          `json:"token,omitempty"`
}

// View renders the job for a client. Position and eta are filled by the
// caller, and only while the job is queued.
func (j *Job) View() View {
	v := View{
		ID: j.ID, Status: j.Status, UserID: j.UserID, Model: j.Model,
		RequestedModel: j.RequestedModel, FallbackReason: j.FallbackReason,
		MaxTokens: j.MaxTokens, Attempts: j.Attempts, CreatedAt: j.CreatedAt,
		Result: j.Result, Usage: j.Usage, Error: j.Error, Metadata: j.Metadata,
		Class: j.Class,
	}
	if v.Class == "" {
		v.Class = "interactive"
	}
	if j.CostMicroUSD != 0 {
		c := float64(j.CostMicroUSD) / 1e6
		v.CostUSD = &c
	}
	if !j.DeadlineAt.IsZero() {
		t := j.DeadlineAt
		v.DeadlineAt = &t
	}
	if !j.DispatchedAt.IsZero() {
		t := j.DispatchedAt
		v.DispatchedAt = &t
		v.DispatchSeq = j.DispatchSeq
		v.DispatchedVia = "messages"
	}
	if j.Via == "batch" {
		v.DispatchedVia, v.BatchID = "batch", j.BatchID
	}
	if !j.StartedAt.IsZero() {
		t := j.StartedAt
		v.StartedAt = &t
	}
	if !j.FinishedAt.IsZero() {
		t := j.FinishedAt
		v.FinishedAt = &t
	}
	if j.Status == Succeeded {
		text := j.Text
		v.Text = &text
	}
	return v
}

// NewID returns an unguessable id for a job of model group g: "job_", the
// group's hash tag (rkeys.Tag: the job's keys live in its group's slot)
// and 115 random bits, 26 base32 characters in all.
func NewID(g string) string {
	var b [15]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	r := strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b[:]))
	return "job_" + rkeys.Tag(g) + r[:26-rkeys.TagLen]
}

// ValidID reports whether s has the shape of a job id, so a malformed id is
// a 404 without a Redis call and never becomes part of a key.
func ValidID(s string) bool {
	if len(s) != 4+26 || !strings.HasPrefix(s, "job_") {
		return false
	}
	for _, c := range s[4:] {
		if !(c >= 'a' && c <= 'z' || c >= '2' && c <= '7') {
			return false
		}
	}
	return true
}

// Token is a job's read token: an HMAC of the job id under the fleet's
// token secret, so any api process can give it again (an idempotent
// replay) while only its hash is kept in the record.
func Token(secret []byte, id string) string {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(id))
	return "jt_" + base64.RawURLEncoding.EncodeToString(m.Sum(nil)[:24])
}

const tokenSecretKey = rkeys.TokenSecret

// TokenSecret returns the fleet's token secret, creating it on first use.
// It lives in Redis, like every other piece of the fleet's shared state.
func TokenSecret(ctx context.Context, rdb redis.UniversalClient) ([]byte, error) {
	var b [32]byte
	_, _ = rand.Read(b[:])
	if _, err := rdb.SetNX(ctx, tokenSecretKey, hex.EncodeToString(b[:]), 0).Result(); err != nil {
		return nil, fmt.Errorf("jobs: token secret: %w", err)
	}
	v, err := rdb.Get(ctx, tokenSecretKey).Result()
	if err != nil {
		return nil, fmt.Errorf("jobs: token secret: %w", err)
	}
	return hex.DecodeString(v)
}

// HashToken is how a token is kept: its SHA-256, hex.
func HashToken(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// TokenMatches compares a presented token with the job's, in constant time.
func (j *Job) TokenMatches(token string) bool {
	if token == "" || j.TokenHash == "" {
		return false
	}
	return subtle.ConstantTimeCompare([]byte(HashToken(token)), []byte(j.TokenHash)) == 1
}

// TimeLayout is how the API writes times: UTC with exactly three
// fractional digits ("2026-11-29T20:24:03.590Z"), so every timestamp has
// the same width.
const TimeLayout = "2006-01-02T15:04:05.000Z07:00"

// MarshalJSON writes v with its times in TimeLayout (encoding/json alone
// drops trailing zeros: ".59Z", or no fraction at all).
func (v View) MarshalJSON() ([]byte, error) {
	type plain View
	at := func(t *time.Time) *string {
		if t == nil {
			return nil
		}
		s := t.UTC().Format(TimeLayout)
		return &s
	}
	return json.Marshal(struct {
		plain
		CreatedAt    *string `json:"created_at"`
		DeadlineAt   *string `json:"deadline_at,omitempty"`
		DispatchedAt *string `json:"dispatched_at,omitempty"`
		StartedAt    *string `json:"started_at,omitempty"`
		FinishedAt   *string `json:"finished_at,omitempty"`
	}{plain(v), at(&v.CreatedAt), at(v.DeadlineAt), at(v.DispatchedAt), at(v.StartedAt), at(v.FinishedAt)})
}
