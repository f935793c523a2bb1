package e2b

// CloseIdleConnections lets tests drop keep-alive connections (goleak).
func (c *Client) CloseIdleConnections() { c.http.CloseIdleConnections() }
