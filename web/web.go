// Package web holds sluice's embedded pages, served as plain files: no build
// step. static/index.html is the demo chat page; admin/ is the ops
// dashboard, served only behind the admin key (api/routes.go).
package web

import (
	"embed"
	"io/fs"
	"net/http"
	"strings"
)

//go:embed static
var static embed.FS

//go:embed admin
var admin embed.FS

// Handler serves the pages.
func Handler() http.Handler {
	sub, _ := fs.Sub(static, "static")
	return http.FileServer(http.FS(sub))
}

// Dashboard serves the ops dashboard: /dashboard is its page, and
// /dashboard/<file> its scripts and styles. Mount it behind admin auth.
func Dashboard() http.Handler {
	sub, _ := fs.Sub(admin, "admin")
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		name := strings.TrimPrefix(strings.TrimPrefix(r.URL.Path, "/dashboard"), "/")
		if name == "" {
			name = "index.html"
		}
		if strings.Contains(name, "/") || strings.HasPrefix(name, ".") {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Cache-Control", "no-store")
		http.ServeFileFS(w, r, sub, name)
	})
}
