package worker

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"time"
)

// deltaLog writes an attempt's text into the job's event log beside the
// upstream call, never in its way: text that arrives while a write is in
// flight waits and goes out with the next write, as one delta. A write that
// fails because Redis is slow or away is tried again (with the text that
// arrived meanwhile) until it succeeds, so no text is lost and the order
// holds. A write the job refuses (it was canceled, or dispatched again)
// stops the attempt: nobody wants the rest of that answer.
type deltaLog struct {
	write   func(ctx context.Context, text string) error
	refuse  func() // stops the call after a refusal
	log     *slog.Logger
	mu      sync.Mutex
	pending strings.Builder
	err     error // the refusal, once there was one
	busy    bool  // a write is in flight (or waiting to be tried again)
	kick    chan struct{}
	idle    chan struct{} // closed and replaced each time nothing is pending
	quit    chan struct{}
	done    chan struct{}
}

func newDeltaLog(write func(context.Context, string) error, refuse func(), log *slog.Logger) *deltaLog {
	return &deltaLog{write: write, refuse: refuse, log: log,
		kick: make(chan struct{}, 1), idle: make(chan struct{}), quit: make(chan struct{}), done: make(chan struct{})}
}

// add queues text; it never blocks.
func (d *deltaLog) add(text string) {
	d.mu.Lock()
	if d.err == nil {
		d.pending.WriteString(text)
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

// flush waits until every queued text is written (nil), the job refused a
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

// errUnwritten: the writer stopped with text not yet written.
var errUnwritten = errors.New("the answer's text could not be logged")

// close stops the writer; text not yet written is dropped (the attempt
// ended without an answer to keep).
func (d *deltaLog) close() {
	close(d.quit)
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
			d.mu.Lock()
			text := d.pending.String()
			d.pending.Reset()
			if text == "" || d.err != nil {
				d.busy = false
				close(d.idle)
				d.idle = make(chan struct{})
				d.mu.Unlock()
				break
			}
			d.mu.Unlock()
			wctx, cancel := context.WithTimeout(ctx, persistTry)
			err := d.write(wctx, text)
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
			// Redis is away: keep the text, in order, and try again.
			d.mu.Lock()
			rest := d.pending.String()
			d.pending.Reset()
			d.pending.WriteString(text + rest)
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
