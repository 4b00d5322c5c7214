package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/jobs"
)

// job is one request a client sends: its own Idempotency-Key and its own
// prompt (so that the upstream's count per prompt is a count per job).
type job struct {
	key    string
	user   string
	prompt string
	reply  int // output tokens the prompt asks for

	id         string    // from the 202
	acceptedAt time.Time // when the 202 came
	refused    string    // a 4xx that is not worth retrying, or why the client gave up
	final      *view     // the terminal state read back
	missing    bool      // 404 when read back
}

// view is the part of a job's JSON the suite reads.
type view struct {
	ID         string     `json:"id"`
	Status     string     `json:"status"`
	Attempts   int        `json:"attempts"`
	StartedAt  *time.Time `json:"started_at"`
	FinishedAt *time.Time `json:"finished_at"`
	Usage      *struct {
		OutputTokens int `json:"output_tokens"`
	} `json:"usage"`
	Error *struct {
		Type    string `json:"type"`
		Message string `json:"message"`
	} `json:"error"`
}

// load is the clients of one scenario and what they saw.
type load struct {
	c      *cluster
	scen   string
	client *http.Client
	ctx    context.Context // submissions give up when it ends
	wg     sync.WaitGroup

	mu       sync.Mutex
	jobs     []*job
	codes    map[int]int // every answer to POST /v1/jobs that was not a 202
	connErrs int         // transport errors (refused, reset, timed out)
	replays  int         // 202s with Idempotent-Replayed: true
	samples  map[int]string
	nAcc     int                   // jobs accepted so far
	triggers map[int]chan struct{} // closed once nAcc reaches the key
}

// whenAccepted is closed once n jobs were accepted.
func (l *load) whenAccepted(n int) <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	ch := make(chan struct{})
	if l.nAcc >= n {
		close(ch)
		return ch
	}
	l.triggers[n] = ch
	return ch
}

func newLoad(t *testing.T, c *cluster, scen string, giveUp time.Duration) *load {
	ctx, cancel := context.WithTimeout(context.Background(), giveUp)
	t.Cleanup(cancel)
	tr := &http.Transport{MaxIdleConns: 256, MaxIdleConnsPerHost: 128, IdleConnTimeout: 30 * time.Second}
	t.Cleanup(tr.CloseIdleConnections)
	return &load{c: c, scen: scen, ctx: ctx, codes: map[int]int{}, samples: map[int]string{}, triggers: map[int]chan struct{}{},
		client: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

// newJob makes the n-th job of the scenario: user one of 20, a unique
// prompt asking for reply output tokens.
func (l *load) newJob(reply int) *job {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := len(l.jobs)
	j := &job{
		key:    fmt.Sprintf("%s-%05d-%x", l.scen, n, rand.Uint32()),
		user:   fmt.Sprintf("user-%02d", n%20),
		prompt: fmt.Sprintf("chaos %s job %05d: tell me something [[reply_tokens=%d]]", l.scen, n, reply),
		reply:  reply,
	}
	l.jobs = append(l.jobs, j)
	return j
}

// send submits a new job in the background.
func (l *load) send(reply int) {
	j := l.newJob(reply)
	l.wg.Go(func() { l.submit(j) })
}

// burst submits n jobs (the i-th asking for reply(i) output tokens) with
// the given number of clients at once, and returns when every one was
// accepted or given up.
func (l *load) burst(n, clients int, reply func(i int) int) {
	js := make([]*job, n)
	for i := range js {
		js[i] = l.newJob(reply(i))
	}
	next := make(chan *job)
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for j := range next {
				l.submit(j)
			}
		})
	}
	for _, j := range js {
		next <- j
	}
	close(next)
	wg.Wait()
}

// steady submits rate jobs a second for d, each in its own goroutine (a
// client per request, as many users pressing send), and returns after the
// last one was sent; wait() waits for the answers to the submissions.
func (l *load) steady(rate float64, d time.Duration, reply func(i int) int) {
	every := time.Duration(float64(time.Second) / rate)
	tick := time.NewTicker(every)
	defer tick.Stop()
	end := time.Now().Add(d)
	for i := 0; time.Now().Before(end); i++ {
		l.send(reply(i))
		<-tick.C
	}
}

// wait waits for every submission sent in the background.
func (l *load) wait() { l.wg.Wait() }

// submit sends one job until it is accepted: the client retries on
// connection errors, 5xx and 429 (honouring Retry-After, at most 1 s),
// always with the same Idempotency-Key, against whichever api is current.
// Another 4xx or the load's deadline ends it.
func (l *load) submit(j *job) {
	body, _ := json.Marshal(map[string]any{
		"user_id": j.user,
		"request": map[string]any{"model": model, "max_tokens": j.reply + 10,
			"messages": []map[string]string{{"role": "user", "content": j.prompt}}},
	})
	backoff := 100 * time.Millisecond
	for {
		if err := l.ctx.Err(); err != nil {
			l.mu.Lock()
			j.refused = "gave up: " + err.Error()
			l.mu.Unlock()
			return
		}
		req, _ := http.NewRequestWithContext(l.ctx, http.MethodPost, l.c.API()+"/v1/jobs", strings.NewReader(string(body)))
		req.Header.Set("x-api-key", tenantKey)
		req.Header.Set("content-type", "application/json")
		req.Header.Set("Idempotency-Key", j.key)
		resp, err := l.client.Do(req)
		if err != nil {
			l.mu.Lock()
			l.connErrs++
			l.mu.Unlock()
			sleepJitter(backoff)
			backoff = min(2*backoff, time.Second)
			continue
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusAccepted {
			var v view
			if err := json.Unmarshal(b, &v); err != nil || v.ID == "" {
				l.mu.Lock()
				j.refused = fmt.Sprintf("202 without a job: %s", b)
				l.mu.Unlock()
				return
			}
			l.mu.Lock()
			j.id, j.acceptedAt = v.ID, time.Now()
			if resp.Header.Get("Idempotent-Replayed") == "true" {
				l.replays++
			}
			l.nAcc++
			if ch, ok := l.triggers[l.nAcc]; ok {
				close(ch)
				delete(l.triggers, l.nAcc)
			}
			l.mu.Unlock()
			return
		}
		l.mu.Lock()
		l.codes[resp.StatusCode]++
		if _, ok := l.samples[resp.StatusCode]; !ok {
			l.samples[resp.StatusCode] = strings.TrimSpace(string(b))
		}
		l.mu.Unlock()
		if resp.StatusCode < 500 && resp.StatusCode != http.StatusTooManyRequests {
			l.mu.Lock()
			j.refused = fmt.Sprintf("%d %s", resp.StatusCode, b)
			l.mu.Unlock()
			return
		}
		wait := backoff
		if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s > 0 {
			wait = min(time.Duration(s)*time.Second, time.Second)
		}
		sleepJitter(wait)
		backoff = min(2*backoff, time.Second)
	}
}

// sleepJitter sleeps between d/2 and d (a client's retry delay).
func sleepJitter(d time.Duration) {
	time.Sleep(d/2 + rand.N(d/2+1))
}

// accepted are the jobs that got a 202.
func (l *load) accepted() []*job {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []*job
	for _, j := range l.jobs {
		if j.id != "" {
			out = append(out, j)
		}
	}
	return out
}

// firstAcceptedAfter is when the first 202 came after at (zero if none).
func (l *load) firstAcceptedAfter(at time.Time) time.Time {
	var first time.Time
	for _, j := range l.accepted() {
		if j.acceptedAt.After(at) && (first.IsZero() || j.acceptedAt.Before(first)) {
			first = j.acceptedAt
		}
	}
	return first
}

// settle reads every accepted job back until it is terminal, or within
// passes. A 404 marks the job missing (read again until the end: only a
// job still missing then counts as lost).
func (l *load) settle(within time.Duration) {
	deadline := time.Now().Add(within)
	var pending []*job
	for _, j := range l.accepted() {
		if j.final == nil {
			pending = append(pending, j)
		}
	}
	for len(pending) > 0 && time.Now().Before(deadline) {
		var mu sync.Mutex
		var still []*job
		next := make(chan *job)
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				for j := range next {
					v, code, err := l.get(j.id)
					mu.Lock()
					switch {
					case err == nil && code == http.StatusOK && jobs.Status(v.Status).Terminal():
						j.final, j.missing = v, false
					case err == nil && code == http.StatusNotFound:
						j.missing = true
						still = append(still, j)
					default:
						still = append(still, j)
					}
					mu.Unlock()
				}
			})
		}
		for _, j := range pending {
			next <- j
		}
		close(next)
		wg.Wait()
		pending = still
		if len(pending) > 0 {
			time.Sleep(500 * time.Millisecond) // jobs finish in their own time
		}
	}
}

func (l *load) get(id string) (*view, int, error) {
	req, _ := http.NewRequest(http.MethodGet, l.c.API()+"/v1/jobs/"+id, nil)
	req.Header.Set("x-api-key", tenantKey)
	resp, err := l.client.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil, resp.StatusCode, nil
	}
	var v view
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return nil, resp.StatusCode, err
	}
	return &v, resp.StatusCode, nil
}

// listAll lists the tenant's jobs (every page) and returns their ids.
func (l *load) listAll() (map[string]bool, error) {
	ids := map[string]bool{}
	cursor := ""
	for range 1000 {
		u := l.c.API() + "/v1/jobs?limit=100"
		if cursor != "" {
			u += "&cursor=" + url.QueryEscape(cursor)
		}
		req, _ := http.NewRequest(http.MethodGet, u, nil)
		req.Header.Set("x-api-key", tenantKey)
		resp, err := l.client.Do(req)
		if err != nil {
			return nil, err
		}
		var page struct {
			Jobs       []view `json:"jobs"`
			NextCursor string `json:"next_cursor"`
		}
		err = json.NewDecoder(resp.Body).Decode(&page)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || err != nil {
			return nil, fmt.Errorf("list: %d %v", resp.StatusCode, err)
		}
		for _, v := range page.Jobs {
			ids[v.ID] = true
		}
		if page.NextCursor == "" {
			return ids, nil
		}
		cursor = page.NextCursor
	}
	return nil, errors.New("list: too many pages")
}

// result is one scenario's row.
type result struct {
	name      string
	accepted  int
	succeeded int
	failed    int
	lost      int
	dup       int // complete upstream answers beyond the first, over all jobs
	fiveXX    int // 5xx answers to POST /v1/jobs other than 503
	five03    int
	// expected failed jobs (0 unless a scenario says otherwise)
	wantFailed int
	took       time.Duration
	fault      string // what was done, when
	notes      []string
	misses     []string
	done       bool // the scenario ran to its end
	// lossMeasured: jobs lost and answers bought twice are what the
	// scenario measures (a setting that allows them), reported in the
	// notes rather than failed on.
	lossMeasured bool
}

// count reads the upstream's journal and the jobs' final states and fills
// in a result; every miss is also a test error.
func (l *load) count(t *testing.T, r *result) {
	t.Helper()
	acc := l.accepted()
	r.accepted = len(acc)
	counts := l.c.upstreamCounts()
	byPrompt := map[string]*job{}
	l.mu.Lock()
	var unaccepted []string
	for _, j := range l.jobs {
		if j.id == "" {
			unaccepted = append(unaccepted, j.key+": "+j.refused)
			continue
		}
		byPrompt[j.prompt] = j
	}
	for code, n := range l.codes {
		switch {
		case code == http.StatusServiceUnavailable:
			r.five03 += n
		case code >= 500:
			r.fiveXX += n
		}
	}
	codes := make([]int, 0, len(l.codes))
	for code := range l.codes {
		codes = append(codes, code)
	}
	sort.Ints(codes)
	var codeNotes []string
	for _, code := range codes {
		codeNotes = append(codeNotes, fmt.Sprintf("%d×%d", l.codes[code], code))
	}
	connErrs, replays := l.connErrs, l.replays
	samples := l.samples
	l.mu.Unlock()

	var failedWhy, lostWhy, dupWhy, shortWhy []string
	attempts := map[int]int{}
	noAnswer := 0
	for _, j := range acc {
		switch {
		case j.final == nil && j.missing:
			r.lost++
			lostWhy = append(lostWhy, j.id+" (404)")
		case j.final == nil:
			r.lost++
			lostWhy = append(lostWhy, j.id+" (never terminal)")
		case j.final.Status == "succeeded":
			r.succeeded++
			attempts[j.final.Attempts]++
			if j.final.Usage == nil || j.final.Usage.OutputTokens != j.reply {
				got := -1
				if j.final.Usage != nil {
					got = j.final.Usage.OutputTokens
				}
				shortWhy = append(shortWhy, fmt.Sprintf("%s: %d output tokens, asked %d", j.id, got, j.reply))
			}
		default:
			r.failed++
			why := j.final.Status
			if j.final.Error != nil {
				why += " " + j.final.Error.Type + ": " + j.final.Error.Message
			}
			failedWhy = append(failedWhy, j.id+" "+why)
		}
		n := counts[j.prompt].Complete
		if n > 1 {
			r.dup += n - 1
			dupWhy = append(dupWhy, fmt.Sprintf("%s (%d complete answers, %d calls)", j.id, n, counts[j.prompt].Calls))
		}
		if n == 0 && j.final != nil && j.final.Status == "succeeded" {
			noAnswer++
		}
	}
	calls, complete, foreign := 0, 0, 0
	for p, pc := range counts {
		calls += pc.Calls
		complete += pc.Complete
		if _, ok := byPrompt[p]; !ok && strings.HasPrefix(p, "chaos ") {
			foreign += pc.Complete
		}
	}

	r.notes = append(r.notes, fmt.Sprintf("%d upstream calls, %d complete", calls, complete))
	if replays > 0 {
		r.notes = append(r.notes, fmt.Sprintf("%d idempotent replays", replays))
	}
	if connErrs > 0 {
		r.notes = append(r.notes, fmt.Sprintf("%d client connection errors", connErrs))
	}
	if len(codeNotes) > 0 {
		r.notes = append(r.notes, "non-202 answers "+strings.Join(codeNotes, " "))
	}
	var ns []int
	for n := range attempts {
		ns = append(ns, n)
	}
	sort.Ints(ns)
	var at []string
	for _, n := range ns {
		at = append(at, fmt.Sprintf("%d with %d", attempts[n], n))
	}
	r.notes = append(r.notes, "succeeded jobs by attempts: "+strings.Join(at, ", "))

	miss := func(format string, args ...any) {
		r.misses = append(r.misses, fmt.Sprintf(format, args...))
		t.Errorf(format, args...)
	}
	if len(unaccepted) > 0 {
		miss("%d requests never accepted: %s", len(unaccepted), clip(unaccepted))
	}
	switch {
	case r.lossMeasured:
		r.notes = append(r.notes, fmt.Sprintf("measured, not asserted: %d of %d accepted jobs lost, %d answers bought twice", r.lost, r.accepted, r.dup))
		if r.lost != 0 {
			r.notes = append(r.notes, "lost: "+clip(lostWhy))
		}
		if r.dup != 0 {
			r.notes = append(r.notes, "bought twice: "+clip(dupWhy))
		}
	default:
		if r.lost != 0 {
			miss("lost %d jobs (want 0): %s", r.lost, clip(lostWhy))
		}
		if r.dup != 0 {
			miss("%d duplicate complete upstream answers (want 0): %s", r.dup, clip(dupWhy))
		}
	}
	if r.fiveXX != 0 {
		var s []string
		for code, b := range samples {
			if code >= 500 && code != http.StatusServiceUnavailable {
				s = append(s, fmt.Sprintf("%d %s", code, b))
			}
		}
		sort.Strings(s)
		miss("%d 5xx answers other than 503 (want 0): %s", r.fiveXX, clip(s))
	}
	if r.failed != r.wantFailed {
		miss("%d jobs failed (want %d): %s", r.failed, r.wantFailed, clip(failedWhy))
	}
	if len(shortWhy) > 0 {
		miss("%d succeeded jobs with a wrong answer length: %s", len(shortWhy), clip(shortWhy))
	}
	if noAnswer > 0 {
		miss("%d jobs succeeded without a complete upstream answer in the journal", noAnswer)
	}
	if foreign > 0 {
		miss("%d complete upstream answers for prompts of jobs no client was told of", foreign)
	}
	if ids, err := l.listAll(); err != nil {
		t.Logf("listing the jobs: %v", err)
	} else {
		known := map[string]bool{}
		for _, j := range acc {
			known[j.id] = true
		}
		var orphans []string
		for id := range ids {
			if !known[id] {
				orphans = append(orphans, id)
			}
		}
		sort.Strings(orphans)
		if len(orphans) > 0 {
			miss("%d jobs exist that no client was told of (a request admitted twice?): %s", len(orphans), clip(orphans))
		}
	}
}

// clip joins at most 5 items.
func clip(items []string) string {
	if len(items) > 5 {
		return strings.Join(items[:5], "; ") + fmt.Sprintf("; … (%d more)", len(items)-5)
	}
	return strings.Join(items, "; ")
}
