"""Alert webhooks: signed POSTs, sent from a durable outbox, retried until delivered, never a flood.

`tables` holds the webhooks, the outbox of deliveries and every attempt;
`outbox.enqueue` adds deliveries in the transaction that raised an alert;
`worker.WebhookWorker` sends them in the background (`sender` does the one
blocking POST, `payload` and `signing` make what is posted); `store` has every
read and write of those tables, for the REST routes and the outbox alike: the
one storage module outside `layerwatch.server.store`.
"""
