package worker

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/upstream"
)

// Events of an answer in the job's event log (docs/api.md, "Events").
const (
	evDelta      = "delta"          // {"text", "index"}: text of a text block
	evBlockStart = "block_start"    // {"index", "content_block"}: a block other than plain text began
	evBlockDelta = "block_delta"    // {"index", "delta"}: a delta other than text, as the upstream sent it
	evBlockStop  = "block_stop"     // {"index"}: a block that had a block_start ended
	evUpstream   = "upstream_event" // an upstream event of a type sluice does not know, as sent
)

// maxBatch bounds the events one write logs.
const maxBatch = 256

// logEvent is an event waiting to be logged: a text delta (text, index),
// whose later text for the same block joins it while it waits, or an event
// with its data ready (any other, or a delta already encoded once).
type logEvent struct {
	name  string
	index int
	text  *strings.Builder // a text delta not yet encoded
	data  json.RawMessage  // the others
}

func (e logEvent) encode() jobs.NewEvent {
	if e.text == nil {
		return jobs.NewEvent{Name: e.name, Data: e.data}
	}
	b, _ := json.Marshal(struct {
		Text  string `json:"text"`
		Index int    `json:"index"`
	}{e.text.String(), e.index})
	return jobs.NewEvent{Name: evDelta, Data: b}
}

// partEvent is the log event of one part of the answer.
func partEvent(p upstream.Part) logEvent {
	idx := strconv.Itoa(p.Index)
	switch p.Kind {
	case upstream.PartText:
		var b strings.Builder
		b.WriteString(p.Text)
		return logEvent{name: evDelta, index: p.Index, text: &b}
	case upstream.PartBlockStart:
		return logEvent{name: evBlockStart, data: json.RawMessage(`{"index":` + idx + `,"content_block":` + string(p.Raw) + `}`)}
	case upstream.PartBlockDelta:
		return logEvent{name: evBlockDelta, data: json.RawMessage(`{"index":` + idx + `,"delta":` + string(p.Raw) + `}`)}
	case upstream.PartBlockStop:
		return logEvent{name: evBlockStop, data: json.RawMessage(`{"index":` + idx + `}`)}
	}
	return logEvent{name: evUpstream, data: p.Raw}
}

// deltaLog writes an attempt's answer into the job's event log beside the
// upstream call, never in its way: parts that arrive while a write is in
// flight wait and go out with the next write, all in one step (text for
// the same block joined into one delta). A write that fails because Redis
// is slow or away is tried again (with what arrived meanwhile) until it
// succeeds, so nothing is lost and the order holds. A write the job
// refuses (it was canceled, or dispatched again) stops the attempt: nobody
// wants the rest of that answer.
type deltaLog struct {
	write   func(ctx context.Context, evs []jobs.NewEvent) error
	refuse  func() // stops the call after a refusal
	log     *slog.Logger
	mu      sync.Mutex
	pending []logEvent
	err     error // the refusal, once there was one
	busy    bool  // a write is in flight (or waiting to be tried again)
	kick    chan struct{}
	idle    chan struct{} // closed and replaced each time nothing is pending
	quit    chan struct{}
	stop    sync.Once
	done    chan struct{}
}

func newDeltaLog(write func(context.Context, []jobs.NewEvent) error, refuse func(), log *slog.Logger) *deltaLog {
	return &deltaLog{write: write, refuse: refuse, log: log,
		kick: make(chan struct{}, 1), idle: make(chan struct{}), quit: make(chan struct{}), done: make(chan struct{})}
}

// add queues a part of the answer; it never blocks.
func (d *deltaLog) add(p upstream.Part) {
	d.mu.Lock()
	if d.err == nil {
		n := len(d.pending)
		if p.Kind == upstream.PartText && n > 0 && d.pending[n-1].text != nil && d.pending[n-1].index == p.Index {
			d.pending[n-1].text.WriteString(p.Text)
		} else {
			d.pending = append(d.pending, partEvent(p))
		}
		d.busy = true
	}
	d.mu.Unlock()
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

// refusal is the job's refusal of a write, if there was one.
func (d *deltaLog) refusal() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.err
}

// flush waits until every queued part is written (nil), the job refused a
// write (that refusal), or ctx ends.
func (d *deltaLog) flush(ctx context.Context) error {
	d.mu.Lock()
	busy, idle, err := d.busy, d.idle, d.err
	d.mu.Unlock()
	if err != nil || !busy {
		return err
	}
	select {
	case <-idle:
		return d.refusal()
	case <-ctx.Done():
		return ctx.Err()
	case <-d.done:
		if err := d.refusal(); err != nil {
			return err
		}
		return errUnwritten
	}
}

// errUnwritten: the writer stopped with parts of the answer not yet written.
var errUnwritten = errors.New("the answer's text could not be logged")

// close stops the writer and waits for a write in flight to end; parts not
// yet written are dropped (the attempt ended without an answer to keep).
// Calls after the first only wait.
func (d *deltaLog) close() {
	d.stop.Do(func() { close(d.quit) })
	<-d.done
}

// run writes until close; a failed write is tried again until ctx ends.
func (d *deltaLog) run(ctx context.Context) {
	defer close(d.done)
	delay := 20 * time.Millisecond
	warned := false
	for {
		select {
		case <-d.quit:
			return
		case <-d.kick:
		}
		for {
			select {
			case <-d.quit:
				return // closed: nothing more is written
			default:
			}
			d.mu.Lock()
			if len(d.pending) == 0 || d.err != nil {
				d.pending = nil
				d.busy = false
				close(d.idle)
				d.idle = make(chan struct{})
				d.mu.Unlock()
				break
			}
			batch := d.pending[:min(len(d.pending), maxBatch)]
			d.pending = d.pending[len(batch):]
			evs := make([]jobs.NewEvent, len(batch))
			for i, e := range batch {
				evs[i] = e.encode() // under mu: add may still join text to the last one
			}
			d.mu.Unlock()
			wctx, cancel := context.WithTimeout(ctx, persistTry)
			err := d.write(wctx, evs)
			cancel()
			if err == nil {
				delay, warned = 20*time.Millisecond, false
				continue
			}
			if refused(err) {
				d.mu.Lock()
				d.err = err
				d.mu.Unlock()
				d.refuse()
				continue
			}
			// Redis is away: keep the events, in order, and try again.
			d.mu.Lock()
			kept := make([]logEvent, len(evs))
			for i, ev := range evs {
				kept[i] = logEvent{name: ev.Name, data: ev.Data}
			}
			d.pending = append(kept, d.pending...)
			d.mu.Unlock()
			if !warned {
				d.log.Warn("could not log the answer's text; keeping it and trying again", "err", err)
				warned = true
			}
			select {
			case <-d.quit:
				return
			case <-ctx.Done():
				return
			case <-time.After(delay):
			}
			delay = min(2*delay, time.Second)
		}
	}
}
