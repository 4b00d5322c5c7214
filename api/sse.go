package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/labstack/echo/v5"

	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/redisconn"
)

// jobEvents is GET /v1/jobs/{id}/events: the job's Server-Sent Events. It
// replays what the client missed (Last-Event-ID or ?last_event_id=), then
// follows live events until the terminal one, the client leaving, or the
// server shutting down.
func (s *Server) jobEvents(c *echo.Context) error {
	job, err := s.authorizedJob(c)
	if redisconn.Unavailable(err) {
		s.redisAway(err)
		return s.streamUnavailable(c, true)
	}
	if err != nil {
		return err
	}
	after := c.Request().Header.Get("Last-Event-ID")
	if q := c.QueryParam("last_event_id"); q != "" {
		after = q
	}
	if after != "" && !jobs.ValidEventID(after) {
		return invalid("last_event_id", "Last-Event-ID %q is not an event id of this stream; reconnect without it to get the whole history.", truncate(after, 64))
	}
	cancelOnDisconnect := c.QueryParam("cancel_on_disconnect") == "true"
	ctx, cancel := context.WithCancel(c.Request().Context())
	defer cancel()
	stopWatch := context.AfterFunc(s.stop, cancel)
	defer stopWatch()

	// Followers are counted across api processes, so a queued job asked to
	// be canceled on disconnect is canceled only when its last one leaves.
	// Each stream's count is a lease this process renews: a killed api's
	// followers stop counting when their leases end.
	if member, err := s.followers.Join(ctx, job.ID); err == nil {
		defer func() {
			lctx, lcancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer lcancel()
			left, err := s.followers.Leave(lctx, job.ID, member)
			clientLeft := c.Request().Context().Err() != nil && s.stop.Err() == nil
			if err == nil && left <= 0 && cancelOnDisconnect && clientLeft {
				s.cancelOnDisconnect(job)
			}
		}()
	}

	// Subscribe before reading the log, so nothing falls between the two.
	sub, err := s.d.Hub.Subscribe(ctx, job.ID)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		if redisconn.Unavailable(err) {
			s.redisAway(err)
			return s.streamUnavailable(c, true)
		}
		return err
	}
	defer sub.Close()
	if job.Status == jobs.Queued {
		defer s.watch(job, after)() // its place in line moves while it waits
	}

	w := c.Response()
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("Connection", "keep-alive")
	h.Set("X-Accel-Buffering", "no") // nginx: do not buffer
	w.WriteHeader(http.StatusOK)
	flush := http.NewResponseController(w)
	if _, err := fmt.Fprint(w, ": sluice event stream\nretry: 2000\n\n"); err != nil {
		return nil
	}
	_ = flush.Flush()

	var buf []byte // the event being written, reused for the next one
	err = sub.Follow(ctx, after, s.heartbeat,
		func() error {
			if _, err := w.Write(heartbeatComment); err != nil {
				return err
			}
			return flush.Flush()
		},
		func(ev jobs.Event) (bool, error) {
			buf = appendEvent(buf[:0], ev)
			_, err := w.Write(buf)
			if cap(buf) > maxKeptEventBuffer {
				buf = nil // a rare large event: do not keep its buffer
			}
			if err != nil {
				return true, err
			}
			return false, flush.Flush()
		})
	if redisconn.Unavailable(err) && ctx.Err() == nil {
		s.redisAway(err)
		_ = s.streamUnavailable(c, false)
		return nil
	}
	if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, jobs.ErrHubClosed) {
		s.log.Debug("event stream ended", "job_id", job.ID, "tenant", job.Tenant, "user_id", job.UserID, "err", err)
	}
	return nil // the response is committed; errors end the stream
}

// appendEvent appends one event as the stream sends it:
// "id: <id>\nevent: <name>\ndata: <data>\n\n".
func appendEvent(b []byte, ev jobs.Event) []byte {
	b = append(b, "id: "...)
	b = append(b, ev.ID...)
	b = append(b, "\nevent: "...)
	b = append(b, ev.Name...)
	b = append(b, "\ndata: "...)
	b = append(b, ev.Data...)
	return append(b, "\n\n"...)
}

var heartbeatComment = []byte(": heartbeat\n\n")

// streamUnavailable ends an event stream because Redis is away: an
// `unavailable` event says so and when to come back, and the retry field
// makes an EventSource reconnect then, with the Last-Event-ID it has, so it
// misses nothing. head: the stream's headers are not written yet.
func (s *Server) streamUnavailable(c *echo.Context, head bool) error {
	w := c.Response()
	if head {
		h := w.Header()
		h.Set("Content-Type", "text/event-stream")
		h.Set("Cache-Control", "no-cache")
		h.Set("Retry-After", strconv.Itoa(unavailableRetry))
		w.WriteHeader(http.StatusOK)
	}
	data, _ := json.Marshal(errUnavailable.body()["error"])
	_, err := fmt.Fprintf(w, "retry: %d\nevent: unavailable\ndata: %s\n\n", unavailableRetry*1000, data)
	_ = http.NewResponseController(w).Flush()
	return err
}

// maxKeptEventBuffer is the largest event buffer a stream keeps between
// events (most events are well under 1 KiB).
const maxKeptEventBuffer = 64 << 10

// cancelOnDisconnect cancels a still-queued job whose last follower left
// (?cancel_on_disconnect=true), refunding it. A running job is left alone.
func (s *Server) cancelOnDisconnect(job *jobs.Job) {
	g, ok := s.group(job.Group)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := s.cancel(ctx, job, g, jobs.Queued); err == nil {
		s.log.Info("job canceled: its last follower left", "job_id", job.ID, "tenant", job.Tenant, "user_id", job.UserID)
	}
}
