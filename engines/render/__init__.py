"""The warp renderer: mediapipe's face mesh warped onto the identity (warp, mesh, raster,
geometry), with what a warp cannot show filled in (mouth, eyes, paint, memory), and output
frames of another shape (frame: the avatar fitted into a call's 16:9 frame; scene: pasted
back into the identity's photo), and the looks an identity can be restyled into (style).
Arrays in, arrays out; imports only engines.landmarks beside itself."""
