//go:build tools

// Package tools pins etcd's server and etcdctl. etcd's modules carry replace directives,
// so `go install ...@version` refuses them; requiring them from this module resolves
// their siblings (api, client, pkg) to their published releases instead.
package tools

import (
	_ "go.etcd.io/etcd/etcdctl/v3"
	_ "go.etcd.io/etcd/server/v3"
)
