package jobs

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/internal/rkeys"
)

// Key layout: see package rkeys.

func jobKey(id string) string    { return rkeys.Job(id) }
func eventsKey(id string) string { return rkeys.JobEvents(id) }
func channel(id string) string   { return rkeys.JobChannel(id) }

// ChannelPrefix prefixes every job's live-event channel: ChannelPrefix + id.
const ChannelPrefix = rkeys.JobChannelPrefix

// CountsKey is the Redis hash of a user's queued and running job counts in
// model group g.
func CountsKey(g, tenant, user string) string { return rkeys.UserCounts(g, tenant, user) }

// IndexKey is the Redis sorted set of a tenant's jobs of model group g by
// creation time (user "" = all the tenant's users).
func IndexKey(g, tenant, user string) string {
	if user == "" {
		return rkeys.TenantJobs(g, tenant)
	}
	return rkeys.UserJobs(g, tenant, user)
}

// Key is the Redis key of a job record.
func Key(id string) string { return jobKey(id) }

// EventsKey is the Redis key of a job's event log.
func EventsKey(id string) string { return eventsKey(id) }

// Channel is the Pub/Sub channel of a job's live events.
func Channel(id string) string { return channel(id) }

// Defaults for Options.
const (
	// DefaultRetention is how long a job record and its events are kept after
	// the job was created or last finished.
	DefaultRetention = 7 * 24 * time.Hour
	// DefaultMaxEvents caps one job's event log (a delta per output token;
	// 64k output tokens fit).
	DefaultMaxEvents = 100_000
)

// Errors of the store. The api maps them to HTTP statuses in one place.
var (
	ErrNotFound = errors.New("job not found")
)

// StateError says a transition was refused because of the job's status.
type StateError struct{ Current Status }

func (e *StateError) Error() string { return "job is " + string(e.Current) }

// Options tune a Store.
type Options struct {
	Retention time.Duration // default DefaultRetention
	MaxEvents int           // default DefaultMaxEvents
	Clock     func() time.Time
}

// Store keeps jobs and their events in Redis. Safe for concurrent use by any
// number of processes: every write that checks a status is one Lua script.
type Store struct {
	rdb       redis.UniversalClient
	retention time.Duration
	maxEvents int
	now       func() time.Time
}

var (
	//go:embed lua/append.lua
	appendSrc    string
	appendScript = redis.NewScript(appendSrc)
)

// NewStore returns a Store on rdb.
func NewStore(rdb redis.UniversalClient, o Options) *Store {
	if o.Retention <= 0 {
		o.Retention = DefaultRetention
	}
	if o.MaxEvents <= 0 {
		o.MaxEvents = DefaultMaxEvents
	}
	if o.Clock == nil {
		o.Clock = time.Now
	}
	return &Store{rdb: rdb, retention: o.Retention, maxEvents: o.MaxEvents, now: o.Clock}
}

// Fields are the hash fields of a new job record (the scheduler stores it
// in the same atomic step that queues it).
func (s *Store) Fields(j *Job) []any {
	fields := []any{
		"tenant", j.Tenant, "user_id", j.UserID, "model", j.Model, "group", j.Group,
		"status", string(Queued), "max_tokens", j.MaxTokens, "attempts", 0,
		"request", string(j.Request), "created_at", MillisString(j.CreatedAt),
		"token_hash", j.TokenHash,
	}
	if !j.DeadlineAt.IsZero() {
		fields = append(fields, "deadline_at", MillisString(j.DeadlineAt))
	}
	if len(j.Metadata) > 0 {
		fields = append(fields, "metadata", string(j.Metadata))
	}
	if j.RequestedModel != "" {
		fields = append(fields, "requested_model", j.RequestedModel, "fallback_from", j.FallbackFrom, "fallback_reason", j.FallbackReason)
	}
	if j.Class != "" {
		fields = append(fields, "class", j.Class)
	}
	return fields
}

// Owner is the tenant and user of job id, for log lines ("" when the
// record cannot be read).
func (s *Store) Owner(ctx context.Context, id string) (tenant, user string) {
	v, err := s.rdb.HMGet(ctx, jobKey(id), "tenant", "user_id").Result()
	if err != nil || len(v) != 2 {
		return "", ""
	}
	tenant, _ = v[0].(string)
	user, _ = v[1].(string)
	return tenant, user
}

// TTLSeconds is how long records and event logs are kept, in seconds.
func (s *Store) TTLSeconds() int { return int(s.retention / time.Second) }

// MaxEvents caps one job's event log.
func (s *Store) MaxEvents() int { return s.maxEvents }

// Get reads a job. A missing (or expired) job is ErrNotFound.
func (s *Store) Get(ctx context.Context, id string) (*Job, error) {
	if !ValidID(id) {
		return nil, ErrNotFound
	}
	m, err := s.rdb.HGetAll(ctx, jobKey(id)).Result()
	if err != nil {
		return nil, fmt.Errorf("jobs: get %s: %w", id, err)
	}
	if len(m) == 0 || m["status"] == "" {
		return nil, ErrNotFound
	}
	return fromHash(id, m)
}

// Tally is one counter a job's transition bumps (the usage statistics):
// HINCRBY Key Field By, or, when Sorted, ZINCRBY Key By Field. TTL (whole
// seconds; 0 = leave it) is set on Key each time.
type Tally struct {
	Key    string        `json:"k"`
	Field  string        `json:"f"`
	Sorted bool          `json:"z"`
	By     int64         `json:"n"`
	TTL    time.Duration `json:"-"`
}

// WaitingUsersKey is the hash of a model group's users with queued jobs
// (user key → how many): its length is the group's active users. Admission
// adds to it; every transition out of queued keeps it.
func WaitingUsersKey(group string) string { return rkeys.WaitingUsers(group) }

// Append logs an event of a job that must be in status want (and, when
// dispatch > 0, at that dispatch).
func (s *Store) Append(ctx context.Context, id string, want Status, dispatch int, event string, data any) (string, error) {
	b, err := json.Marshal(data)
	if err != nil {
		return "", err
	}
	return s.AppendEvents(ctx, id, want, dispatch, []NewEvent{{Name: event, Data: b}})
}

// NewEvent is an event to log: its name and its data, a JSON object.
type NewEvent struct {
	Name string
	Data json.RawMessage
}

// AppendEvents logs events of a job that must be in status want (and, when
// dispatch > 0, at that dispatch), in order and all at once: either every
// one is logged and published or none is. It returns the last one's id.
func (s *Store) AppendEvents(ctx context.Context, id string, want Status, dispatch int, evs []NewEvent) (string, error) {
	if len(evs) == 0 {
		return "", nil
	}
	args := make([]any, 0, 4+2*len(evs))
	args = append(args, string(want), channel(id), s.maxEvents, dispatch)
	for _, ev := range evs {
		args = append(args, ev.Name, string(ev.Data))
	}
	evID, err := appendScript.Run(ctx, s.rdb, []string{jobKey(id), eventsKey(id)}, args...).Text()
	if err != nil {
		return "", scriptError(id, err)
	}
	return evID, nil
}

func scriptError(id string, err error) error {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "NOTFOUND"):
		return ErrNotFound
	case strings.HasPrefix(msg, "STATE "):
		return &StateError{Current: Status(strings.TrimPrefix(msg, "STATE "))}
	}
	return fmt.Errorf("jobs: %s: %w", id, err)
}

// Event is one entry of a job's event log.
type Event struct {
	ID   string          `json:"id"`
	Name string          `json:"event"`
	Data json.RawMessage `json:"data"`
}

// Terminal reports whether the event ends the job's stream.
func (e Event) Terminal() bool { return Status(e.Name).Terminal() }

// Events returns up to count events logged after the event id after ("" =
// from the start). The job's first event (queued) is kept in its record
// rather than its stream (admission is cheaper so); it comes first here.
func (s *Store) Events(ctx context.Context, id, after string, count int64) ([]Event, error) {
	start := "-"
	if after != "" {
		start = "(" + loggedID(after)
	}
	pipe := s.rdb.Pipeline()
	// The record first: a terminal status read here has its event in the
	// log read after it (one atomic step writes both).
	first := pipe.HMGet(ctx, jobKey(id), "ev0_id", "ev0", "status", "requested_model", "fallback_from", "fallback_reason")
	rng := pipe.XRangeN(ctx, eventsKey(id), start, "+", count)
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("jobs: events of %s: %w", id, err)
	}
	msgs := rng.Val()
	out := make([]Event, 0, len(msgs)+1)
	v := first.Val()
	ev0ID := ""
	if len(v) == 6 && v[0] != nil && v[1] != nil {
		ev0 := Event{ID: fmt.Sprint(v[0]), Name: string(Queued), Data: fallbackData(json.RawMessage(fmt.Sprint(v[1])), v[3], v[4], v[5])}
		ev0ID = ev0.ID
		if after == "" || compareEventIDs(ev0.ID, after) > 0 {
			out = append(out, ev0)
		}
	}
	ended := false
	for _, m := range msgs {
		name, _ := m.Values["event"].(string)
		data, _ := m.Values["data"].(string)
		ev := Event{ID: m.ID, Name: name, Data: json.RawMessage(data)}
		ended = ended || ev.Terminal()
		out = append(out, ev)
	}
	if len(v) == 6 && !ended && int64(len(msgs)) < count {
		if st, _ := v[2].(string); Status(st).Terminal() {
			ev, err := s.lostEnd(ctx, id, after, ev0ID)
			if err != nil {
				return nil, err
			}
			if ev != nil {
				out = append(out, *ev)
			}
		}
	}
	return out, nil
}

// fallbackData is the data of a job's queued event with, when the job
// fell back to another model group, requested_model, fallback_from and
// fallback_reason added (kept in the record by admission, beside the
// event's place and wait).
func fallbackData(data json.RawMessage, requested, from, reason any) json.RawMessage {
	r, _ := requested.(string)
	if r == "" {
		return data
	}
	var m map[string]any
	if json.Unmarshal(data, &m) != nil || m == nil {
		return data
	}
	m["requested_model"], m["fallback_from"], m["fallback_reason"] = r, from, reason
	out, err := json.Marshal(m)
	if err != nil {
		return data
	}
	return out
}

// lostEnd is the terminal event of an ended job whose log lost it (its
// stream was evicted or deleted), rebuilt from the record so that its
// followers are not left waiting for it; nil when the log ends with it (a
// follower that already had it reconnected). Its id follows the log's last
// event, ev0 and after.
func (s *Store) lostEnd(ctx context.Context, id, after, ev0ID string) (*Event, error) {
	last, err := s.rdb.XRevRangeN(ctx, eventsKey(id), "+", "-", 1).Result()
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("jobs: events of %s: %w", id, err)
	}
	base := loggedID(ev0ID)
	if len(last) == 1 {
		name, _ := last[0].Values["event"].(string)
		if Status(name).Terminal() {
			return nil, nil
		}
		if compareEventIDs(last[0].ID, base) > 0 {
			base = last[0].ID
		}
	}
	if after != "" && compareEventIDs(loggedID(after), base) > 0 {
		base = loggedID(after)
	}
	j, err := s.Get(ctx, id)
	if err != nil {
		if errors.Is(err, ErrNotFound) {
			return nil, nil
		}
		return nil, err
	}
	var data any = struct{}{}
	switch {
	case j.Status == Succeeded:
		data = j.View()
	case j.Error != nil:
		data = map[string]any{"error": j.Error}
	}
	b, err := json.Marshal(data)
	if err != nil {
		return nil, err
	}
	p := idParts(base)
	return &Event{ID: strconv.FormatUint(p[0], 10) + "-" + strconv.FormatUint(p[1]+1, 10), Name: string(j.Status), Data: b}, nil
}

// ValidEventID reports whether s looks like an event id, so a client's
// Last-Event-ID never reaches Redis malformed. Logged events have the
// Stream's ids ("ms-seq"); a pushed position, which is not logged, has the
// id of the logged event before it plus ".n" ("ms-seq.n").
func ValidEventID(s string) bool {
	base, n, hasN := strings.Cut(s, ".")
	ms, seq, ok := strings.Cut(base, "-")
	if !ok {
		return false
	}
	_, err1 := strconv.ParseUint(ms, 10, 64)
	_, err2 := strconv.ParseUint(seq, 10, 64)
	if hasN {
		if _, err := strconv.ParseUint(n, 10, 64); err != nil {
			return false
		}
	}
	return err1 == nil && err2 == nil
}

// loggedID is the logged event an id is or follows ("ms-seq").
func loggedID(id string) string {
	base, _, _ := strings.Cut(id, ".")
	return base
}

// nextPushedID is the id of a pushed (unlogged) event that follows the
// event last: the same logged id with the next ".n".
func nextPushedID(last string) string {
	base, n, _ := strings.Cut(last, ".")
	k, _ := strconv.ParseUint(n, 10, 64)
	return base + "." + strconv.FormatUint(k+1, 10)
}

// compareEventIDs orders event ids: by the logged id, then by ".n" (none
// comes first).
func compareEventIDs(a, b string) int {
	x, y := idParts(a), idParts(b)
	for k := range x {
		if x[k] != y[k] {
			if x[k] < y[k] {
				return -1
			}
			return 1
		}
	}
	return 0
}

// idParts splits "ms-seq" or "ms-seq.n" into its numbers (n is 0 when
// absent; malformed parts read as 0: ids are checked by ValidEventID).
func idParts(id string) [3]uint64 {
	base, n, _ := strings.Cut(id, ".")
	ms, seq, _ := strings.Cut(base, "-")
	var out [3]uint64
	for k, s := range []string{ms, seq, n} {
		out[k], _ = strconv.ParseUint(s, 10, 64)
	}
	return out
}

func timeFromMillis(s string) time.Time {
	if s == "" {
		return time.Time{}
	}
	ms, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return time.Time{}
	}
	return time.UnixMilli(ms).UTC()
}

// CostField is the record's field that adds up what the job's upstream
// calls cost, in µ$ (usage statistics bump it with each call).
const CostField = "cost_musd"

func fromHash(id string, m map[string]string) (*Job, error) {
	j := &Job{
		ID: id, Tenant: m["tenant"], UserID: m["user_id"], Model: m["model"], Group: m["group"],
		RequestedModel: m["requested_model"], FallbackFrom: m["fallback_from"], FallbackReason: m["fallback_reason"],
		Status: Status(m["status"]), Text: m["text"], TokenHash: m["token_hash"], Class: m["class"],
		CreatedAt: timeFromMillis(m["created_at"]), StartedAt: timeFromMillis(m["started_at"]),
		FinishedAt: timeFromMillis(m["finished_at"]), DeadlineAt: timeFromMillis(m["deadline_at"]),
		NotBefore: timeFromMillis(m["not_before"]),
		FQMember:  m["fq_member"], FQTag: m["fq_tag"], FirstEvent: m["ev0"],
		DispatchedAt: timeFromMillis(m["dispatched_at"]), UnavailableSince: timeFromMillis(m["unavailable_since"]),
		Via: m["via"], BatchID: m["batch_id"], BatchDue: timeFromMillis(m["batch_due"]), BatchClaim: m["batch_claim"],
	}
	j.MaxTokens, _ = strconv.Atoi(m["max_tokens"])
	j.Attempts, _ = strconv.Atoi(m["attempts"])
	j.CostIn, _ = strconv.Atoi(m["cost_in"])
	j.CostOut, _ = strconv.Atoi(m["cost_out"])
	j.Dispatch, _ = strconv.Atoi(m["dispatch"])
	j.Failures, _ = strconv.Atoi(m["failures"])
	j.InfraFailures, _ = strconv.Atoi(m["infra_failures"])
	j.DispatchSeq, _ = strconv.ParseInt(m["dispatch_seq"], 10, 64)
	j.CostMicroUSD, _ = strconv.ParseInt(m[CostField], 10, 64)
	if v := m["request"]; v != "" {
		j.Request = json.RawMessage(v)
	}
	if v := m["metadata"]; v != "" {
		j.Metadata = json.RawMessage(v)
	}
	if v := m["result"]; v != "" {
		j.Result = json.RawMessage(v)
	}
	if v := m["usage"]; v != "" {
		j.Usage = new(Usage)
		if err := json.Unmarshal([]byte(v), j.Usage); err != nil {
			return nil, fmt.Errorf("jobs: %s: bad usage: %w", id, err)
		}
	}
	if v := m["error"]; v != "" {
		j.Error = new(Error)
		if err := json.Unmarshal([]byte(v), j.Error); err != nil {
			return nil, fmt.Errorf("jobs: %s: bad error: %w", id, err)
		}
	}
	return j, nil
}

// MillisString formats a time as the store keeps it.
func MillisString(t time.Time) string { return strconv.FormatInt(t.UnixMilli(), 10) }

// Cursor is a position in a job listing: the last job of a page (its
// index score: creation ms × 1000 + a sequence, and its id).
type Cursor struct {
	Score int64
	ID    string
}

// ListQuery selects jobs to list.
type ListQuery struct {
	// Groups are the model groups whose jobs are listed (each group keeps
	// its own index, in its own slot; the pages merge them).
	Groups       []string
	Tenant, User string // User "" = every user of the tenant
	Status       Status // "" = any
	Limit        int
	After        *Cursor // continue after this job
}

// listScan bounds how many records one page may read when a status filter
// matches few of them; the cursor lets the client go on.
const listScan = 1000

// List returns jobs newest first, and a cursor for the next page (nil on
// the last page).
func (s *Store) List(ctx context.Context, q ListQuery) ([]*Job, *Cursor, error) {
	max := "+inf"
	if q.After != nil {
		max = strconv.FormatInt(q.After.Score, 10)
	}
	var out []*Job
	var outScores []int64
	scanned := 0
	for {
		batch := q.Limit + 1
		if q.Status != "" {
			batch = 100
		}
		ids, more, err := s.newest(ctx, q, max, int64(batch+50))
		if err != nil {
			return nil, nil, fmt.Errorf("jobs: list: %w", err)
		}
		// Skip what the cursor already covered (same millisecond, ids at or
		// after the cursor's in the index's reverse order).
		var page []redis.Z
		for _, z := range ids {
			id := z.Member.(string)
			if q.After != nil && int64(z.Score) == q.After.Score && id >= q.After.ID {
				continue
			}
			page = append(page, z)
		}
		if len(page) == 0 {
			if more {
				return out, q.After, nil // a millisecond of more ids than a batch: go on from the cursor
			}
			return out, nil, nil
		}
		pipe := s.rdb.Pipeline()
		cmds := make([]*redis.MapStringStringCmd, len(page))
		for i, z := range page {
			cmds[i] = pipe.HGetAll(ctx, jobKey(z.Member.(string)))
		}
		if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
			return nil, nil, fmt.Errorf("jobs: list: %w", err)
		}
		for i, z := range page {
			id := z.Member.(string)
			q.After = &Cursor{Score: int64(z.Score), ID: id}
			max = strconv.FormatInt(int64(z.Score), 10)
			scanned++
			m := cmds[i].Val()
			if len(m) == 0 {
				continue // expired record
			}
			j, err := fromHash(id, m)
			if err != nil {
				return nil, nil, err
			}
			if q.Status != "" && j.Status != q.Status {
				if scanned >= listScan {
					return out, q.After, nil
				}
				continue
			}
			if len(out) == q.Limit {
				last := out[len(out)-1]
				return out, &Cursor{Score: outScores[len(outScores)-1], ID: last.ID}, nil
			}
			out = append(out, j)
			outScores = append(outScores, int64(z.Score))
		}
		if !more {
			return out, nil, nil
		}
	}
}

// newest reads the next jobs of the listing, newest first, at or below
// score max: up to n from each group's index, merged. A group that had more
// than n sets a horizon (its last id read): only the ids at or above the
// highest horizon are sure to be complete, so the merged list stops there.
// more says that some index holds more below.
func (s *Store) newest(ctx context.Context, q ListQuery, max string, n int64) (ids []redis.Z, more bool, err error) {
	pipe := s.rdb.Pipeline()
	cmds := make([]*redis.ZSliceCmd, len(q.Groups))
	for i, g := range q.Groups {
		cmds[i] = pipe.ZRevRangeByScoreWithScores(ctx, IndexKey(g, q.Tenant, q.User), &redis.ZRangeBy{Min: "-inf", Max: max, Count: n})
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, false, err
	}
	var horizon *redis.Z
	for _, c := range cmds {
		zs := c.Val()
		ids = append(ids, zs...)
		if int64(len(zs)) == n {
			more = true
			if last := zs[len(zs)-1]; horizon == nil || newer(last, *horizon) {
				horizon = &last
			}
		}
	}
	sort.Slice(ids, func(a, b int) bool { return newer(ids[a], ids[b]) })
	if horizon != nil {
		cut := sort.Search(len(ids), func(i int) bool { return newer(*horizon, ids[i]) })
		ids = ids[:cut]
	}
	return ids, more, nil
}

// newer orders a listing: by score, then by id, both descending (the order
// of ZREVRANGEBYSCORE).
func newer(a, b redis.Z) bool {
	if a.Score != b.Score {
		return a.Score > b.Score
	}
	return a.Member.(string) > b.Member.(string)
}

// Counts are a user's queued and running jobs, summed over groups.
func (s *Store) Counts(ctx context.Context, groups []string, tenant, user string) (queued, running int, err error) {
	pipe := s.rdb.Pipeline()
	cmds := make([]*redis.SliceCmd, len(groups))
	for i, g := range groups {
		cmds[i] = pipe.HMGet(ctx, CountsKey(g, tenant, user), "queued", "running")
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return 0, 0, err
	}
	n := func(x any) int {
		i, _ := strconv.Atoi(fmt.Sprint(x))
		return max(0, i)
	}
	for _, c := range cmds {
		v := c.Val()
		queued += n(v[0])
		running += n(v[1])
	}
	return queued, running, nil
}
